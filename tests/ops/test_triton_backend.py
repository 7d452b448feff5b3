"""The "triton" backend end to end: dispatch and its errors, the custom ops (schema / fake checks,
float64 gradcheck of the backward formulas through the torch mirror) and torch.compile.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import mhckit.ops as ops  # noqa: E402
from mhckit import functional as F  # noqa: E402
from mhckit import reference as R  # noqa: E402
from mhckit.ops import triton_autograd as TA  # noqa: E402
from tests.conftest import TOL, compiled_step_matches_eager, make_mhc_inputs  # noqa: E402
from tests.ops.conftest import DEVICE, triton_gpt, triton_gpt_tokens  # noqa: E402


def _layer(mod, x, phi, bias, alpha, w, **kw):
    """One mHC sublayer with a Linear branch: coeffs -> pre -> branch -> post_res."""
    h_pre, h_post, h_res = mod.mhc_coeffs(x, phi, bias, alpha, iters=6, **kw)
    u = mod.mhc_pre(x, h_pre, **kw)
    return mod.mhc_post_res(x, u @ w, h_post, h_res, **kw)


def _leaves(lead=(3, 5), n=4, c=24, dtype=torch.float32, device=DEVICE):
    x, phi, bias, alpha = make_mhc_inputs(lead, n, c, dtype=dtype, seed=n + c)
    w = torch.randn(c, c, dtype=dtype) / c**0.5
    return [t.to(device).requires_grad_() for t in (x, phi, bias, alpha, w)]


def test_functional_backend_triton_matches_reference():
    leaves = _leaves()
    ref = _layer(R, *leaves)
    fast = _layer(F, *leaves, backend="triton")
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(fast, ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref)
    grads = zip(torch.autograd.grad(fast, leaves, grad), torch.autograd.grad(ref, leaves, grad))
    for name, (a, b) in zip("x phi bias alpha w".split(), grads):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10, msg=f"grad {name}")
    logits = leaves[0].detach()[..., :4]  # [3, 5, 4, 4]
    torch.testing.assert_close(F.sinkhorn(logits, 5, backend="triton"), R.sinkhorn(logits, 5), rtol=rtol, atol=atol)


def test_auto_is_torch_on_cpu_and_triton_is_listed():
    x = torch.randn(2, 4, 8)
    assert ops.resolve_backend("auto", x) == "torch"
    assert ops.resolve_backend("auto") == "torch"
    assert "triton" in ops.available_backends()
    if DEVICE.type == "cuda":
        assert ops.resolve_backend("auto", x.to(DEVICE)) == "triton"
        assert ops.resolve_backend("auto", x.to(DEVICE).double()) == "torch"


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"backend: got 'triton', which is not available: .*CPU.*TRITON_INTERPRET=1"):
        F.mhc_pre(x, torch.rand(2, 4), backend="triton")


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 4, 8, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)), "float64"),
        (lambda: (torch.randn(2, 9, 8), torch.rand(2, 9)), "n_streams <= 8; got n_streams=9"),
    ],
)
def test_unsupported_inputs_raise(make, match):
    x, h = (t.to(DEVICE) for t in make())
    with pytest.raises(ValueError, match=match):
        F.mhc_pre(x, h, backend="triton")
    assert F.mhc_pre(x, h, backend="auto").shape == x.shape[:1] + x.shape[2:]  # auto falls back to torch


def test_missing_triton_says_what_to_install(monkeypatch):
    why = "Triton is not importable (...); install it with `pip install triton`"
    monkeypatch.setattr(ops, "_triton_import_error", lambda: why)
    with pytest.raises(ValueError, match=r"which is not available: Triton is not importable.*pip install triton"):
        F.sinkhorn(torch.randn(2, 3, 3), backend="triton")
    assert ops.available_backends() == ("torch", "reference")


# --------------------------------------------------------------------------------------------------
# The custom ops' torch mirror (CPU tensors, interpreter off): backward formulas in float64
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def mirror(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_mirror_backward_formulas_pass_gradcheck_float64(mirror, n):
    x, phi, bias, alpha, w = _leaves(lead=(2,), n=n, c=3, dtype=torch.float64, device="cpu")
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, phi, bias, alpha, y):
        h_pre, h_post, h_res = TA.mhc_coeffs(x, phi, bias, alpha, iters=4)
        return TA.mhc_post_res(x, y * TA.mhc_pre(x, h_pre).sum(), h_post, h_res)

    assert torch.autograd.gradcheck(fn, (x, phi, bias, alpha, y))
    logits = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: TA.sinkhorn(t, 5), (logits,))


def test_mirror_matches_reference_fp32(mirror):
    leaves = _leaves(device="cpu")
    ref, fast = _layer(R, *leaves), _layer(TA, *leaves)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_custom_ops_pass_opcheck(mirror):
    """Schema, fake (meta) implementations and autograd registration are consistent."""
    x, phi, bias, alpha, _ = _leaves(lead=(5,), n=2, c=8, device="cpu")
    xf = x.detach().reshape(-1, 2, 8)
    h_pre, h_post, h_res = (t.detach().requires_grad_() for t in R.mhc_coeffs(x, phi, bias, alpha))
    y = torch.randn(5, 8, requires_grad=True)
    x_leaf = xf.clone().requires_grad_()
    checks = [
        (torch.ops.mhckit.coeffs.default, (x_leaf, phi, bias, alpha, 3, 1e-6)),
        (torch.ops.mhckit.pre.default, (x_leaf, h_pre)),
        (torch.ops.mhckit.post_res.default, (x_leaf, y, h_post, h_res)),
        (torch.ops.mhckit.sinkhorn.default, (torch.randn(5, 3, 3, requires_grad=True), 4)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernels", "torch-mirror"])
def test_custom_ops_fakes_match_strided_operands(mirror, c_kernels):
    """Forward and backward ops given non-contiguous operands (a transposed h_res, as HC's reaches
    post_res; strided x, y, gradients): the fake promises the strides the op returns. (The fakes once
    returned empty_like(input): a transposed dh_res, and inductor's stride assertion failed.)"""
    from mhckit.ops import cpu

    t, n, c, k = 5, 3, 8, 15
    g = torch.Generator().manual_seed(0)

    def strided(*shape):  # the same values, non-contiguous: the last two dims transposed in memory
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)

    def every_other(*shape):  # non-contiguous rows: every second value of a wider tensor
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]

    x, grad = strided(t, n, c), strided(t, n, c)
    y, h_post, h_res = every_other(t, c), every_other(t, n), strided(t, n, n)
    phi, bias, alpha = torch.randn(n * c, k, generator=g) * 0.1, torch.randn(k, generator=g), torch.rand(3, generator=g)
    h_pre, _, _, z, r = torch.ops.mhckit.coeffs.default(x.contiguous(), phi, bias, alpha, 3, 1e-6)
    assert not any(v.is_contiguous() for v in (x, grad, y, h_post, h_res))
    checks = [
        (torch.ops.mhckit.post_res.default, (x, y, h_post, h_res)),
        (torch.ops.mhckit.post_res_backward.default, (x, y, h_post, h_res, grad)),
        (torch.ops.mhckit.pre.default, (x, h_pre)),
        (torch.ops.mhckit.pre_backward.default, (x, h_pre, y)),
        (torch.ops.mhckit.coeffs_backward.default, (x, phi, bias, alpha, z, r, h_pre, h_post, h_res, 3)),
        (torch.ops.mhckit.sinkhorn.default, (h_res, 3)),
        (torch.ops.mhckit.sinkhorn_backward.default, (h_res, strided(t, n, n), 3)),
    ]
    with contextlib.nullcontext() if c_kernels else cpu.disabled():
        for op, args in checks:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# torch.compile: the ops are opaque graph nodes, no graph breaks
# --------------------------------------------------------------------------------------------------
def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    leaves = _leaves(lead=(2, 3), n=4, c=16)

    def fn(x, phi, bias, alpha, w):
        return _layer(F, x, phi, bias, alpha, w, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out, comp_out = fn(*leaves), compiled(*leaves)
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(eager_out)
    for a, b in zip(torch.autograd.grad(comp_out, leaves, grad), torch.autograd.grad(eager_out, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_gpt_with_recompute_on_the_triton_ops():
    """GPTConfig.recompute under torch.compile with the Triton backend (on the GPU when there is one):
    one graph of checkpoint regions whose mhckit:: operators (Triton reads and write-backs) are
    recomputed; loss and gradients equal the eager model without recomputation."""
    compiled_step_matches_eager(triton_gpt(recompute=-1), triton_gpt(), triton_gpt_tokens(), atol=1e-5)


def test_empty_and_multi_dim_leading_shapes():
    leaves = _leaves(lead=(0, 3), n=2, c=8)
    out = _layer(F, *leaves, backend="triton")
    assert out.shape == (0, 3, 2, 8)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
