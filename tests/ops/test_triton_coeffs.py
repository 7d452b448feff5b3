"""Fused Triton mHC coefficients (mhckit/ops/triton/coeffs.py) against mhckit.reference.

Forward (h_pre, h_post, h_res) and every gradient (x, phi, bias, alpha); awkward sizes (tokens not
a multiple of the block, C not a power of two, n in 1..8), forced splits of the reduction axes,
bf16 streams (flash-attention's 2x rule), saved-tensor footprint. Runs on CUDA when present, else
in Triton's interpreter (tests/ops/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mhckit import reference as R  # noqa: E402
from mhckit.ops import triton_autograd as TA  # noqa: E402
from tests.conftest import TOL, make_mhc_inputs  # noqa: E402
from tests.ops.conftest import DEVICE, max_abs_err  # noqa: E402


def _inputs(lead, n, c, dtype=torch.float32, seed=0, phi_scale=0.5):
    x, phi, bias, alpha = make_mhc_inputs(lead, n, c, dtype=dtype, seed=seed, phi_scale=phi_scale)
    return [t.to(DEVICE).requires_grad_() for t in (x, phi, bias, alpha)]


def _grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outs]
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, leaves)


def _launch(x, phi, bias, alpha, iters, splits):
    """Launcher-level call with forced splits, wrapped for autograd by hand (tests the split paths)."""
    from mhckit.ops.triton.coeffs import coeffs_bwd, coeffs_fwd

    n, c = x.shape[-2:]
    xf = x.detach().reshape(-1, n, c)
    h_pre, h_post, h_res, z, r = coeffs_fwd(xf, phi.detach(), bias.detach(), alpha.detach(), iters, 1e-6, splits=splits)
    return (h_pre, h_post, h_res), lambda gs: coeffs_bwd(
        xf, phi.detach(), bias.detach(), alpha.detach(), z, r, *gs, iters, splits=splits
    )


# (lead, n, C, iters): tokens 5..37 (block 16 under the interpreter), C in {24, 40}
CASES = [
    ((5,), 1, 40, 20),
    ((2, 9), 2, 24, 7),
    ((19,), 3, 40, 20),
    ((3, 7), 4, 24, 20),
    ((17,), 6, 40, 5),
    ((13,), 8, 24, 3),
]


@pytest.mark.parametrize("lead,n,c,iters", CASES)
def test_forward_and_all_gradients_match_reference_fp32(lead, n, c, iters):
    leaves = _inputs(lead, n, c, seed=n * 7 + c)
    ref = R.mhc_coeffs(*leaves, iters=iters)
    fast = TA.mhc_coeffs(*leaves, iters=iters)
    rtol, atol = TOL[torch.float32]
    for name, a, b in zip(("h_pre", "h_post", "h_res"), fast, ref):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    g_ref, g_fast = _grads(ref, leaves, seed=n), _grads(fast, leaves, seed=n)
    for name, a, b, leaf in zip(("x", "phi", "bias", "alpha"), g_fast, g_ref, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10, msg=f"grad {name}")


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("n,c", [(3, 40), (4, 24)])
def test_split_reductions_match_reference(n, c, splits):
    """D split over programs in the forward, tokens split over programs in the dphi reduction."""
    leaves = _inputs((37,), n, c, seed=splits)
    ref = R.mhc_coeffs(*leaves, iters=4)
    fast, backward = _launch(*leaves, iters=4, splits=splits)
    for name, a, b in zip(("h_pre", "h_post", "h_res"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    g = torch.Generator().manual_seed(1)
    gs = [torch.randn(o.shape, generator=g).to(DEVICE) for o in ref]
    g_ref = torch.autograd.grad(ref, leaves, gs)
    g_fast = backward(gs)
    for name, a, b in zip(("x", "phi", "bias", "alpha"), g_fast, g_ref):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-4, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_streams_error_at_most_twice_the_references(dtype):
    """flash-attention's rule, forward and gradients: |fast(half) - ref(fp32)| <= 2 |ref(half) - ref(fp32)|."""
    lead, n, c = (3, 11), 4, 40
    x32, phi, bias, alpha = _inputs(lead, n, c, seed=3)
    xh = x32.detach().to(dtype).requires_grad_()
    gold = R.mhc_coeffs(x32, phi, bias, alpha)
    ref_h = R.mhc_coeffs(xh, phi, bias, alpha)
    fast_h = TA.mhc_coeffs(xh, phi, bias, alpha)
    for name, g, r, f in zip(("h_pre", "h_post", "h_res"), gold, ref_h, fast_h):
        assert f.dtype == r.dtype == torch.float32, name
        assert max_abs_err(f, g) <= 2 * max_abs_err(r, g) + 1e-6, name
    g_gold = _grads(gold, [x32, phi, bias, alpha], seed=5)
    g_ref = _grads(ref_h, [xh, phi, bias, alpha], seed=5)
    g_fast = _grads(fast_h, [xh, phi, bias, alpha], seed=5)
    assert g_fast[0].dtype == dtype
    for name, g, r, f in zip(("x", "phi", "bias", "alpha"), g_gold, g_ref, g_fast):
        assert max_abs_err(f, g) <= 2 * max_abs_err(r, g) + 1e-6, f"grad {name}"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_large_logits_give_finite_values_and_gradients():
    """Logits of scale 1e2 (exp underflows, Sinkhorn divisors clamp): same values as the reference."""
    leaves = _inputs((9,), 4, 24, seed=2, phi_scale=100.0)
    h = TA.mhc_coeffs(*leaves)
    assert all(torch.isfinite(t).all() for t in h)
    for a, b in zip(h, R.mhc_coeffs(*leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    grads = _grads(h, leaves, seed=0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_saves_no_per_token_copy_of_the_streams():
    """Saved for backward: x (alive anyway), phi, bias, alpha and per-token z [T, K] + r [T] only."""
    lead, n, c = (2, 8), 4, 24
    x, phi, bias, alpha = _inputs(lead, n, c)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TA.mhc_coeffs(x, phi, bias, alpha)
    tokens, k = 16, 2 * n + n * n
    others = [t for t in saved if t.data_ptr() not in (x.data_ptr(), phi.data_ptr())]
    assert len(saved) - len(others) == 2  # x (a view of the caller's tensor) and phi themselves
    assert sum(t.numel() for t in others) <= tokens * (k + 1) + k + 3  # z, r, bias, alpha


def test_bf16_streams_products_are_fp32_accurate():
    """bf16 streams take the split-operand bf16-MMA path: it must equal fp32 maths on the same values."""
    x32, phi, bias, alpha = _inputs((2, 13), 4, 40, seed=8)
    xh = x32.detach().to(torch.bfloat16).requires_grad_()
    xr = xh.detach().float().requires_grad_()  # the same values, in fp32
    ref, fast = R.mhc_coeffs(xr, phi, bias, alpha), TA.mhc_coeffs(xh, phi, bias, alpha)
    for name, a, b in zip(("h_pre", "h_post", "h_res"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    g_ref, g_fast = _grads(ref, [xr, phi, bias, alpha], seed=2), _grads(fast, [xh, phi, bias, alpha], seed=2)
    torch.testing.assert_close(g_fast[0].float(), g_ref[0].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-5)
    for name, a, b in zip(("phi", "bias", "alpha"), g_fast[1:], g_ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad {name}")


def test_no_tokens():
    x, phi, bias, alpha = _inputs((0,), 3, 24)
    h = TA.mhc_coeffs(x, phi, bias, alpha)
    assert [tuple(t.shape) for t in h] == [(0, 3), (0, 3), (0, 3, 3)]
    grads = torch.autograd.grad(sum(t.sum() for t in h), (x, phi, bias, alpha))
    assert all(g.abs().sum() == 0 for g in grads)
