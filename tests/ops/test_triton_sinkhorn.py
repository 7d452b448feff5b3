"""Triton Sinkhorn-Knopp (mhckit/ops/triton/sinkhorn.py) against mhckit.reference.sinkhorn.

The recompute-backward is checked against autograd through the reference's unrolled loop.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mhckit import reference as R  # noqa: E402
from mhckit.ops import triton_autograd as TA  # noqa: E402
from tests.ops.conftest import DEVICE  # noqa: E402


@pytest.mark.parametrize("n,iters", [(1, 3), (2, 20), (3, 20), (4, 1), (4, 20), (6, 5), (8, 7)])
def test_forward_and_gradient_match_reference(n, iters):
    g = torch.Generator().manual_seed(n * 100 + iters)
    logits = (torch.randn(3, 7, n, n, generator=g) * 3).to(DEVICE).requires_grad_()
    grad = torch.randn(3, 7, n, n, generator=g).to(DEVICE)
    ref = R.sinkhorn(logits, iters)
    fast = TA.sinkhorn(logits, iters)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    (g_ref,) = torch.autograd.grad(ref, logits, grad)
    (g_fast,) = torch.autograd.grad(fast, logits, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_bf16_logits_give_fp32_output_and_bf16_gradient():
    logits = torch.randn(20, 4, 4).to(DEVICE, torch.bfloat16).requires_grad_()
    out = TA.sinkhorn(logits, 10)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.sinkhorn(logits, 10), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert g.dtype == torch.bfloat16


def test_large_logits_are_finite():
    logits = (torch.randn(40, 4, 4) * 30).to(DEVICE).requires_grad_()
    out = TA.sinkhorn(logits, 20)
    torch.testing.assert_close(out, R.sinkhorn(logits, 20), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), logits)
    assert torch.isfinite(g).all()
