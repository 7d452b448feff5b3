"""The memory-lean Sinkhorn autograd Function (mhckit.ops.autograd.SinkhornFunction)."""

from __future__ import annotations

import pytest
import torch

from mhckit import functional as F
from mhckit import reference as R
from mhckit.ops.autograd import SinkhornFunction


@pytest.mark.parametrize("iters", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_gradcheck_float64(n, iters):
    logits = (torch.randn(3, n, n, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SinkhornFunction.apply(t, iters), (logits,))


@pytest.mark.parametrize("iters", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_gradient_equals_autograd_through_unrolled_loop(n, iters):
    logits = (torch.randn(8, n, n, dtype=torch.float64) * 3).requires_grad_()
    grad = torch.randn(8, n, n, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(R.sinkhorn(logits, iters), logits, grad)
    (g_fast,) = torch.autograd.grad(SinkhornFunction.apply(logits, iters), logits, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-14)


def test_forward_equals_reference_fp32():
    logits = torch.randn(1000, 4, 4) * 10
    torch.testing.assert_close(F.sinkhorn(logits, 20), R.sinkhorn(logits, 20), rtol=1e-6, atol=1e-7)


def _saved_bytes(fn, logits: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward while ``fn(logits)`` is built."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits)
    return total


def test_saved_footprint_does_not_grow_with_iters():
    logits = torch.randn(256, 4, 4, requires_grad=True)
    lean = {it: _saved_bytes(lambda t: F.sinkhorn(t, it), logits) for it in (1, 5, 20, 50)}
    assert len(set(lean.values())) == 1, lean
    assert lean[20] <= logits.numel() * 4  # the logits themselves, nothing per iteration
    # the test can fail: plain autograd through the loop keeps every iterate
    unrolled = {it: _saved_bytes(lambda t: R.sinkhorn(t, it), logits) for it in (1, 20)}
    assert unrolled[20] > 10 * unrolled[1] > 0


def test_large_logits_give_finite_gradients():
    logits = (torch.randn(64, 4, 4) * 30).requires_grad_()
    F.sinkhorn(logits, 20).square().sum().backward()
    assert torch.isfinite(logits.grad).all()
