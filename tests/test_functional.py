"""mhckit.functional (the fast default path) against mhckit.reference: forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from mhckit import functional as F
from mhckit import reference as R
from tests.conftest import TOL, make_mhc_inputs

SHAPES = [((5,), 1, 3), ((2, 3), 2, 16), ((7,), 3, 10), ((2, 5), 4, 24), ((3,), 6, 5)]


def _run(mod, x, phi, bias, alpha, y):
    h_pre, h_post, h_res = mod.mhc_coeffs(x, phi, bias, alpha, iters=20)
    u = mod.mhc_pre(x, h_pre)
    out = mod.mhc_post_res(x, y + u, h_post, h_res)  # y depends on u: exercises the chain
    return h_pre, h_post, h_res, u, out


def _loss(outs, weights):
    return sum((o.float() * w).sum() for o, w in zip(outs, weights))


@pytest.mark.parametrize("lead,n,c", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_all_gradients_match_reference(lead, n, c, dtype):
    x, phi, bias, alpha = make_mhc_inputs(lead, n, c, dtype=dtype, seed=n + c, requires_grad=True)
    y = torch.randn(*lead, c, dtype=dtype, requires_grad=True)
    leaves = (x, phi, bias, alpha, y)
    ref = _run(R, *leaves)
    fast = _run(F, *leaves)
    weights = [torch.randn(o.shape, dtype=torch.float32) for o in ref]
    g_ref = torch.autograd.grad(_loss(ref, weights), leaves)
    g_fast = torch.autograd.grad(_loss(fast, weights), leaves)
    rtol, atol = TOL[dtype]
    for name, a, b in zip(("h_pre", "h_post", "h_res", "u", "x_new"), fast, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    for name, a, b in zip(("x", "phi", "bias", "alpha", "y"), g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10, msg=f"grad {name}")


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_float64(n):
    x, phi, bias, alpha = make_mhc_inputs((2,), n, 3, seed=11, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, phi, bias, alpha, y):
        h_pre, h_post, h_res = F.mhc_coeffs(x, phi, bias, alpha, iters=5)
        return F.mhc_post_res(x, y * F.mhc_pre(x, h_pre).sum(), h_post, h_res)

    assert torch.autograd.gradcheck(fn, (x, phi, bias, alpha, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_streams_error_at_most_twice_the_references(dtype):
    """flash-attention's rule: fast path's error vs fp32 reference <= 2x the reference's own error in dtype."""
    lead, n, c = (4, 16), 4, 64
    x32, phi, bias, alpha = make_mhc_inputs(lead, n, c, dtype=torch.float32, seed=3)
    y32 = torch.randn(*lead, c)
    gold = _run(R, x32, phi, bias, alpha, y32)
    xh, yh = x32.to(dtype), y32.to(dtype)
    ref_h = _run(R, xh, phi, bias, alpha, yh)
    fast_h = _run(F, xh, phi, bias, alpha, yh)
    for name, g, r, f in zip(("h_pre", "h_post", "h_res", "u", "x_new"), gold, ref_h, fast_h):
        assert f.dtype == r.dtype, name
        err_ref = (r.float() - g.float()).abs().max().item()
        err_fast = (f.float() - g.float()).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-6, f"{name}: fast {err_fast} vs reference {err_ref}"


def test_backend_reference_is_the_reference():
    x, phi, bias, alpha = make_mhc_inputs((3,), 4, 8, seed=5)
    a = F.mhc_coeffs(x, phi, bias, alpha, backend="reference")
    b = R.mhc_coeffs(x, phi, bias, alpha)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_unknown_and_unavailable_backends_raise():
    x = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"backend: got 'cuda-magic'.*expected one of"):
        F.sinkhorn(x, backend="cuda-magic")
    with pytest.raises(ValueError, match=r"backend: got 'triton', which is not available"):
        F.sinkhorn(x, backend="triton")


@pytest.mark.parametrize("lead,n,c", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_coeffs_pre_matches_composition(lead, n, c, dtype):
    """mhc_coeffs_pre (one Function on the torch backend) equals reference coeffs + pre, forward and grads."""
    x, phi, bias, alpha = make_mhc_inputs(lead, n, c, dtype=dtype, seed=7 * n + c, requires_grad=True)
    leaves = (x, phi, bias, alpha)
    ref_c = R.mhc_coeffs(x, phi, bias, alpha)
    ref = (R.mhc_pre(x, ref_c[0]), *ref_c)
    fast = F.mhc_coeffs_pre(x, phi, bias, alpha)
    weights = [torch.randn(o.shape, dtype=torch.float32) for o in ref]
    g_ref = torch.autograd.grad(_loss(ref, weights), leaves)
    g_fast = torch.autograd.grad(_loss(fast, weights), leaves)
    tol_dt = torch.float32 if dtype == torch.bfloat16 else dtype
    rtol, atol = TOL[tol_dt]
    for name, a, b in zip(("u", "h_pre", "h_post", "h_res"), fast, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol * (100 if dtype == torch.bfloat16 else 1),
                                   atol=atol * (100 if dtype == torch.bfloat16 else 1), msg=name)
    g_rtol, g_atol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else (rtol * 10, atol * 10)
    for name, a, b in zip(("x", "phi", "bias", "alpha"), g_fast, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=g_rtol, atol=g_atol, msg=f"grad {name}")


def test_fused_coeffs_pre_gradcheck_float64():
    x, phi, bias, alpha = make_mhc_inputs((2,), 3, 4, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: F.mhc_coeffs_pre(*a, iters=5), (x, phi, bias, alpha))


def _hc_inputs(lead, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pd = torch.float64 if dtype == torch.float64 else torch.float32  # parameters: the compute dtype

    def rnd(*shape, dt=pd, scale=1.0):
        return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dt).requires_grad_()

    x = rnd(*lead, n, c, dt=dtype, scale=3.0)
    return (x, rnd(n), rnd(n), rnd(n, n), rnd(c, scale=0.3), rnd(c, scale=0.3), rnd(c, n, scale=0.3),
            rnd(), rnd())


@pytest.mark.parametrize("lead,n,c", [((5,), 2, 3), ((2, 3), 3, 16), ((7,), 4, 10), ((2, 5), 4, 64), ((3,), 8, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hc_coeffs_match_reference(lead, n, c, dtype):
    """Dynamic HC coefficients on the fast path ((x @ W) / rms(x) in one Function) equal the reference
    (which normalises the streams first), forward and every gradient; bf16 streams give fp32 coefficients."""
    leaves = _hc_inputs(lead, n, c, dtype, seed=n * c)
    ref = R.hc_coeffs(*leaves)
    fast = F.hc_coeffs(*leaves)
    weights = [torch.randn(o.shape, dtype=torch.float32) for o in ref]
    g_ref = torch.autograd.grad(_loss(ref, weights), leaves)
    g_fast = torch.autograd.grad(_loss(fast, weights), leaves)
    rtol, atol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    for name, a, b in zip(("h_pre", "h_post", "h_res"), fast, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        assert a.dtype == b.dtype, i
        # sums over tokens (the weights' gradients) in another order: rounding scales with the largest entry
        r = 2**-7 if a.dtype == torch.bfloat16 else rtol
        tol = dict(rtol=r, atol=max(atol, r * b.abs().max().item()))
        torch.testing.assert_close(a, b, **tol, msg=f"gradient {i}")


def test_hc_coeffs_gradcheck_and_what_it_keeps():
    """The dynamic HC Function passes gradcheck (fp64) and keeps no normalised copy of the streams: besides
    x itself, what the fast path saves for backward is per-stream values (under half a stream tensor),
    where the reference keeps more than a whole stream tensor."""
    from mhckit.ops.autograd import HCDynamicFunction

    x, w = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True), torch.randn(6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: HCDynamicFunction.apply(a, b, 1e-6), (x, w.requires_grad_()))

    def saved_bytes(fn, leaves):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*leaves)
        return sum(b for (ptr, _, _), b in seen.items() if ptr != leaves[0].data_ptr())  # x itself is alive anyway

    leaves = _hc_inputs((16, 64), 4, 64, torch.float32, seed=1)
    stream_bytes = leaves[0].numel() * 4
    assert saved_bytes(F.hc_coeffs, leaves) < 0.5 * stream_bytes
    assert saved_bytes(R.hc_coeffs, leaves) > stream_bytes


def test_hc_coeffs_checks_its_arguments():
    x, sp, so, sr, wp, wo, wr, sa, sb = _hc_inputs((3,), 4, 8, torch.float32, seed=2)
    with pytest.raises(ValueError, match="w_pre, w_post, w_res, scale_alpha, scale_beta: pass all of them"):
        F.hc_coeffs(x, sp, so, sr, wp, wo, None, sa, sb)
    with pytest.raises(ValueError, match=r"w_res.shape: got \(8, 3\); expected \(8, 4\)"):
        F.hc_coeffs(x, sp, so, sr, wp, wo, wr[:, :3], sa, sb)
    static = F.hc_coeffs(x, sp, so, sr)  # static HC: the reference's expressions
    for a, b in zip(static, R.hc_coeffs(x, sp, so, sr)):
        assert torch.equal(a, b)


def test_hc_coeffs_honours_check_finite():
    """With ``mhckit.check_finite()`` on, a NaN in an HC weight is named, as in the other functional ops."""
    import mhckit

    x, sp, so, sr, wp, wo, wr, sa, sb = _hc_inputs((3,), 4, 8, torch.float32, seed=4)
    wr = wr.detach().clone()
    wr[2, 1] = float("nan")
    F.hc_coeffs(x, sp, so, sr, wp, wo, wr, sa, sb)  # off: no check
    with mhckit.check_finite(), pytest.raises(mhckit.NonFiniteError, match="hc_coeffs.*w_res"):
        F.hc_coeffs(x, sp, so, sr, wp, wo, wr, sa, sb)
