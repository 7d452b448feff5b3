"""Triton H_pre read (mhckit/ops/triton/pre.py) against mhckit.reference.mhc_pre: forward and grads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mhckit import reference as R  # noqa: E402
from mhckit.ops import triton_autograd as TA  # noqa: E402
from tests.ops.conftest import DEVICE, max_abs_err  # noqa: E402

CASES = [((5,), 1, 40), ((2, 9), 2, 24), ((19,), 3, 40), ((3, 7), 4, 24), ((17,), 6, 40), ((13,), 8, 24)]


def _inputs(lead, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, c, generator=g).to(DEVICE, dtype).requires_grad_()
    h = torch.rand(*lead, n, generator=g).to(DEVICE).requires_grad_()
    gu = torch.randn(*lead, c, generator=g).to(DEVICE)
    return x, h, gu


@pytest.mark.parametrize("lead,n,c", CASES)
def test_forward_and_gradients_match_reference_fp32(lead, n, c):
    x, h, gu = _inputs(lead, n, c, torch.float32, seed=n + c)
    ref, fast = R.mhc_pre(x, h), TA.mhc_pre(x, h)
    assert fast.dtype == x.dtype and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "h_pre"), torch.autograd.grad(fast, (x, h), gu), torch.autograd.grad(ref, (x, h), gu)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("splits", [2, 3])
def test_split_reduction_over_c(splits):
    from mhckit.ops.triton.pre import pre_bwd

    x, h, gu = _inputs((21,), 3, 40, torch.float32, seed=splits)
    dx, dh = pre_bwd(x.detach(), h.detach(), gu, splits=splits)
    g_ref = torch.autograd.grad(R.mhc_pre(x, h), (x, h), gu)
    torch.testing.assert_close(dx, g_ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, g_ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3, 4])
def test_half_streams_error_at_most_twice_the_references(n, dtype):
    x32, h, gu = _inputs((3, 11), n, 40, torch.float32, seed=7)
    xh = x32.detach().to(dtype).requires_grad_()
    gold, ref_h, fast_h = R.mhc_pre(x32, h), R.mhc_pre(xh, h), TA.mhc_pre(xh, h)
    assert fast_h.dtype == dtype
    assert max_abs_err(fast_h, gold) <= 2 * max_abs_err(ref_h, gold) + 1e-6
    g_gold = torch.autograd.grad(gold, (x32, h), gu)
    g_ref = torch.autograd.grad(ref_h, (xh, h), gu.to(dtype))
    g_fast = torch.autograd.grad(fast_h, (xh, h), gu.to(dtype))
    for name, g, r, f in zip(("x", "h_pre"), g_gold, g_ref, g_fast):
        assert f.dtype == r.dtype, name
        assert max_abs_err(f, g) <= 2 * max_abs_err(r, g) + 1e-6, f"grad {name}"
