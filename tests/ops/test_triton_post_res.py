"""Triton fused H_res mix + H_post write (mhckit/ops/triton/post_res.py) against the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mhckit import reference as R  # noqa: E402
from mhckit.ops import triton_autograd as TA  # noqa: E402
from tests.ops.conftest import DEVICE, max_abs_err  # noqa: E402

CASES = [((5,), 1, 40), ((2, 9), 2, 24), ((19,), 3, 40), ((3, 7), 4, 24), ((17,), 6, 40), ((13,), 8, 24)]
NAMES = ("x", "y", "h_post", "h_res")


def _inputs(lead, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, c, generator=g).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(*lead, c, generator=g).to(DEVICE, dtype).requires_grad_()
    h_post = (2 * torch.rand(*lead, n, generator=g)).to(DEVICE).requires_grad_()
    h_res = torch.rand(*lead, n, n, generator=g).to(DEVICE).requires_grad_()
    grad = torch.randn(*lead, n, c, generator=g).to(DEVICE)
    return (x, y, h_post, h_res), grad


@pytest.mark.parametrize("lead,n,c", CASES)
def test_forward_and_all_gradients_match_reference_fp32(lead, n, c):
    leaves, grad = _inputs(lead, n, c, torch.float32, seed=n * c)
    ref, fast = R.mhc_post_res(*leaves), TA.mhc_post_res(*leaves)
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    g_ref, g_fast = torch.autograd.grad(ref, leaves, grad), torch.autograd.grad(fast, leaves, grad)
    for name, a, b in zip(NAMES, g_fast, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("splits", [2, 3])
def test_split_reduction_over_c(splits):
    from mhckit.ops.triton.post_res import post_res_bwd

    leaves, grad = _inputs((21,), 3, 40, torch.float32, seed=splits)
    fast = post_res_bwd(*(t.detach() for t in leaves), grad, splits=splits)
    g_ref = torch.autograd.grad(R.mhc_post_res(*leaves), leaves, grad)
    for name, a, b in zip(NAMES, fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3, 4])
def test_half_streams_error_at_most_twice_the_references(n, dtype):
    leaves32, grad = _inputs((3, 11), n, 40, torch.float32, seed=9)
    x32, y32, h_post, h_res = leaves32
    xh, yh = (t.detach().to(dtype).requires_grad_() for t in (x32, y32))
    leaves_h = (xh, yh, h_post, h_res)
    gold, ref_h, fast_h = R.mhc_post_res(*leaves32), R.mhc_post_res(*leaves_h), TA.mhc_post_res(*leaves_h)
    assert fast_h.dtype == dtype
    assert max_abs_err(fast_h, gold) <= 2 * max_abs_err(ref_h, gold) + 1e-6
    g_gold = torch.autograd.grad(gold, leaves32, grad)
    g_ref = torch.autograd.grad(ref_h, leaves_h, grad.to(dtype))
    g_fast = torch.autograd.grad(fast_h, leaves_h, grad.to(dtype))
    for name, g, r, f in zip(NAMES, g_gold, g_ref, g_fast):
        assert f.dtype == r.dtype, name
        assert max_abs_err(f, g) <= 2 * max_abs_err(r, g) + 1e-6, f"grad {name}"
