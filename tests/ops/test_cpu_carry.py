"""The sublayer pair on the compiled CPU kernels (CoeffsCarryFunction + PostCarryFunction): the
write-back's stream gradient joins the coefficient backward. Checked against the unfused pair
(CoeffsPreFunction + PostResFunction), the PyTorch ops and the reference, every gradient. These tests
run the pair's Python Functions; the C++ ones (mhckit/ops/cpu/_pair.py, the default where they build)
are checked bitwise against them in test_cpu_pair_cpp.py."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil

import pytest
import torch

from mhckit import functional as F
from mhckit import reference
from mhckit.modules import HyperConnection
from mhckit.ops import cpu
from mhckit.ops.carry import CoeffsCarryFunction, PostCarryFunction, separate_ops
from mhckit.ops.carry import reuse_gradient_buffer as _reuse

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")


@pytest.fixture(autouse=True)
def _python_pair(monkeypatch):
    """The pair's Python Functions, not the C++ ones (see the module docstring)."""
    from mhckit.ops.cpu import _pair

    monkeypatch.setattr(_pair, "_ON", [False])


def _close(a, b, dt):
    tol = dict(rtol=2e-5, atol=2e-6) if dt == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(a, b, **tol)


def _layer(n, c, dt, seed=0, backend="auto", variant="mhc"):
    torch.manual_seed(seed)
    hc = HyperConnection(c, torch.nn.Linear(c, c), variant=variant, n_streams=n, init="identity", backend=backend)
    hc = hc.to(dt)
    with torch.no_grad():  # away from the start, so that every term of the gradient is non-trivial
        hc.coeffs.phi.normal_(0, 0.3)
        hc.coeffs.bias.normal_(0, 0.5)
        hc.coeffs.alpha.uniform_(0.5, 1.5)
    return hc


def _case(n, c, lead, dt, seed=0):
    """A layer, its input streams and an output gradient."""
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(*lead, n, c, generator=gen, dtype=dt, requires_grad=True)
    return _layer(n, c, dt, seed), x, torch.randn(*lead, n, c, generator=gen, dtype=dt)


def _grads(hc, x, g, twice=False):
    for p in [x, *hc.parameters()]:
        p.grad = None
    if twice:  # two write-backs of one read (the carrier's gradients are summed by autograd)
        u, finish = hc.split(x)
        y = hc.branch(u)
        out = finish(y) + 0.5 * finish(y.flip(-1))
    else:
        out = hc(x)
    out.backward(g)
    return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in hc.parameters()]


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c,lead", [(2, 8, (3,)), (3, 13, (2, 5)), (4, 64, (37,)), (4, 67, (9,)), (8, 20, (17,))])
def test_carry_matches_the_unfused_pair(dt, n, c, lead):
    hc, x, g = _case(n, c, lead, dt)
    assert hc.coeffs.read_carry(x) is not None  # the carry path is the one taken here
    fast = _grads(hc, x, g)
    with separate_ops():  # the same layer on the unfused pair
        assert hc.coeffs.read_carry(x) is None
        slow = _grads(hc, x, g)
    for a, b in zip(fast, slow):
        _close(a, b, dt)


def test_carry_matches_the_reference_with_two_write_backs_of_one_read():
    dt = torch.float64
    hc, x, g = _case(4, 16, (11,), dt, seed=1)
    fast = _grads(hc, x, g, twice=True)
    hc.cfg = hc.coeffs.cfg = dataclasses.replace(hc.cfg, backend="reference")
    assert hc.coeffs.read_carry(x) is None
    ref = _grads(hc, x, g, twice=True)
    for a, b in zip(fast, ref):
        _close(a, b, dt)


def switched_off_between_forward_and_backward(hc, x, g, fast, close):
    """The gradients with the kernels switched off after the forward (the pair's PyTorch fallback)
    against ``fast`` (``_grads``' list: output, then the gradients)."""
    for p in [x, *hc.parameters()]:
        p.grad = None
    out = hc(x)
    with cpu.disabled():
        out.backward(g)
    for a, b in zip(fast[1:], [x.grad] + [p.grad for p in hc.parameters()]):
        close(a, b, x.dtype)


def test_kernels_switched_off_between_forward_and_backward():
    """The carry Functions' PyTorch fallback gives the same gradients."""
    hc, x, g = _case(3, 12, (7,), torch.float64, seed=2)
    switched_off_between_forward_and_backward(hc, x, g, _grads(hc, x, g), _close)


@pytest.mark.parametrize("frozen", ["x", "phi", "branch_only"])
def test_carry_with_frozen_inputs(frozen):
    dt = torch.float64
    hc, x, g = _case(4, 8, (9,), dt, seed=3)
    x.requires_grad_(frozen != "x")
    if frozen == "phi":
        hc.coeffs.phi.requires_grad_(False)
    if frozen == "branch_only":
        for p in hc.coeffs.parameters():
            p.requires_grad_(False)

    def run():
        for p in [x, *hc.parameters()]:
            p.grad = None
        hc(x).backward(g)
        return [t.grad for t in [x, *hc.parameters()]]

    fast = run()
    with separate_ops():
        slow = run()
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, dt)


def test_gradcheck_through_the_carry_pair():
    dt = torch.float64
    n, c = 3, 4
    k = 2 * n + n * n
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, n, c, generator=gen, dtype=dt, requires_grad=True)
    phi = (torch.randn(n * c, k, generator=gen, dtype=dt) * 0.5).requires_grad_()
    bias = torch.randn(k, generator=gen, dtype=dt).requires_grad_()
    alpha = (torch.rand(3, generator=gen, dtype=dt) + 0.5).requires_grad_()
    w = torch.randn(c, c, generator=gen, dtype=dt)

    def sublayer(x, phi, bias, alpha):
        u, h_pre, h_post, h_res, carrier = CoeffsCarryFunction.apply(x, phi, bias, alpha, 7, 1e-6)
        return PostCarryFunction.apply(carrier, torch.tanh(u @ w), h_post, h_res)

    assert torch.autograd.gradcheck(sublayer, (x, phi, bias, alpha))


def test_read_only_without_write_back():
    """No write-back: the carrier gets no gradient and the read alone is differentiated."""
    dt = torch.float64
    hc = _layer(4, 8, dt, seed=5)
    x = torch.randn(6, 4, 8, dtype=dt, requires_grad=True)
    u, _ = hc.split(x)
    u.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    co = hc.coeffs
    reference.mhc_pre(x, reference.mhc_coeffs(x, co.phi, co.bias, co.alpha)[0]).square().sum().backward()
    _close(gx, x.grad, dt)


@pytest.mark.parametrize("n,c", [(1, 7), (4, 64), (3, 13)])
def test_post_bwd_matches_the_write_back_backward(n, c):
    """dy and dh_post without reading x, against PyTorch sums and the kernel's all-outputs path."""
    dt = torch.float64
    x, y, g = torch.randn(5, n, c, dtype=dt), torch.randn(5, c, dtype=dt), torch.randn(5, n, c, dtype=dt)
    h_post, h_res = torch.rand(5, n, dtype=dt), torch.rand(5, n, n, dtype=dt)
    gy, gp = (h_post.unsqueeze(-1) * g).sum(-2), (g * y.unsqueeze(-2)).sum(-1)
    _, gy_all, gp_all, _ = cpu.post_res_bwd(x, y, h_post, h_res, g, (True, True, True, True))
    _close(gy_all, gy, dt)
    _close(gp_all, gp, dt)
    for need in [(True, True), (True, False), (False, True)]:
        dy, dp = cpu.post_bwd(y, h_post, g, *need)
        assert (dy is None) != need[0] and (dp is None) != need[1]
        if need[0]:
            _close(dy, gy, dt)
        if need[1]:
            _close(dp, gp, dt)


@pytest.mark.parametrize("name,shape", [("phi", (32, 23)), ("bias", (25,)), ("alpha", (2,))])
def test_replaced_parameter_of_the_wrong_shape_is_a_named_error(name, shape):
    """The carry path checks the parameters' shapes in one comparison; a mismatch still gets the
    error that names the argument (not a kernel reading past the end of phi)."""
    hc = HyperConnection(8, torch.nn.Identity(), variant="mhc", n_streams=4)
    x = torch.randn(2, 3, 4, 8)
    assert hc.coeffs.read_carry(x) is not None
    setattr(hc.coeffs, name, torch.nn.Parameter(torch.zeros(shape)))
    with pytest.raises(ValueError, match="^" + re.escape(f"{name}.shape: got {tuple(shape)}")):
        hc(x)


def test_bad_iters_on_the_carry_path_is_a_named_error():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="^iters: got 0"):
        F._mhc_read_carry(x, torch.zeros(32, 24), torch.zeros(24), torch.ones(3), iters=0, rms_eps=1e-6)


def test_strided_streams_and_a_strided_or_half_branch_output():
    """x that is not contiguous, and a branch whose output is a strided view or bfloat16: the carry
    path (which hands the kernels contiguous tensors of the streams' dtype) equals the unfused pair."""
    dt = torch.float32
    n, c, t = 4, 16, 10
    for branch in (lambda u: torch.cat([torch.tanh(u), u], -1)[..., :c], lambda u: torch.tanh(u).to(torch.bfloat16)):
        torch.manual_seed(3)
        hc = HyperConnection(c, branch, variant="mhc", n_streams=n, init="identity")
        with torch.no_grad():
            hc.coeffs.phi.normal_(0, 0.3)
        base = torch.randn(c, n, t, dtype=dt)
        g = torch.randn(t, n, c, dtype=dt)
        res = []
        for carry in (True, False):
            x = base.permute(2, 1, 0).detach().requires_grad_()  # [t, n, c], not contiguous
            assert not x.is_contiguous()
            if carry:
                assert hc.coeffs.read_carry(x) is not None
            for p in hc.parameters():
                p.grad = None
            with contextlib.nullcontext() if carry else separate_ops():
                out = hc(x)
                out.backward(g)
            res.append([out.detach(), x.grad] + [p.grad.clone() for p in hc.parameters()])
        for a, b in zip(*res):
            _close(a, b, dt)


@pytest.mark.parametrize("used", [("u",), ("h_pre",), ("h_res",), ("h_post",), ("u", "h_pre", "h_post", "h_res")])
def test_read_with_only_some_outputs_differentiated(used):
    """Outputs nobody differentiates reach the backward as None (no zero tensors); any subset that is
    used gives the reference's gradients. (The carrier is only for the write-back: the gradient sent
    along it is read as the write-back's output gradient, not as a gradient of x.)"""
    dt = torch.float64
    hc = _layer(3, 8, dt, seed=7)
    co = hc.coeffs
    x = torch.randn(5, 3, 8, dtype=dt, requires_grad=True)

    def loss(outs):
        return sum((outs[k] ** 2).sum() * (i + 1) for i, k in enumerate(used))

    u, h_pre, h_post, h_res, carrier, triton = co.read_carry(x)
    assert triton is False
    fast = dict(u=u, h_pre=h_pre, h_post=h_post, h_res=h_res, carrier=carrier)
    grads = torch.autograd.grad(loss(fast), [x, co.phi, co.bias, co.alpha], allow_unused=True)
    h_pre, h_post, h_res = reference.mhc_coeffs(x, co.phi, co.bias, co.alpha)
    ref = dict(u=reference.mhc_pre(x, h_pre), h_pre=h_pre, h_post=h_post, h_res=h_res)
    want = torch.autograd.grad(loss(ref), [x, co.phi, co.bias, co.alpha], allow_unused=True)
    for a, b in zip(grads, want):
        if b is None:
            assert a is None or not a.any()
        else:
            _close(a, b, dt)


def test_separate_ops_switch_and_its_environment_variable():
    """separate_ops() (nestable) and MHCKIT_FUSED_PAIR=0 put HyperConnection on the separate ops; after
    the block the pair is back."""
    import os
    import subprocess
    import sys

    hc, x, _ = _case(4, 8, (3,), torch.float32)
    with separate_ops():
        with separate_ops():
            assert hc.coeffs.read_carry(x) is None
        assert hc.coeffs.read_carry(x) is None
    assert hc.coeffs.read_carry(x) is not None
    code = ("import torch, mhckit; hc = mhckit.HyperConnection(8, None, n_streams=4, variant='mhc'); "
            "print(hc.coeffs.read_carry(torch.randn(3, 4, 8)) is None)")
    for value, want in (("0", "True"), ("1", "False")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MHCKIT_FUSED_PAIR=value),
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == want, (value, out)


# ---- the coefficient backward writing dx over the write-back's output gradient (carry._exclusive)


def _stack(dt=torch.float32, n=4, c=21, depth=3, variant="mhc", hc_dynamic=True):
    torch.manual_seed(0)
    hcs = torch.nn.ModuleList(
        HyperConnection(c, torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, c)), variant=variant,
                        n_streams=n, layer_index=i, hc_dynamic=hc_dynamic)
        for i in range(depth)).to(dt)
    with torch.no_grad():  # away from the start, so that every term of the gradients is non-trivial
        for p in hcs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 5, n, c, dtype=dt, requires_grad=True)
    return hcs, x


# the variants on the pair, and the kernel call whose stream gradient may reuse its operand's buffer
_REUSERS = [("mhc", True, "coeffs_bwd", "g_out"), ("mhc-lite", True, "coeffs_bwd", "g_out"),
            ("identity", True, "coeffs_bwd", "g_out"), ("hc", True, "hc_bwd", 2), ("hc", False, "read_bwd", 4)]


@pytest.mark.parametrize("variant,dynamic,kernel,g_arg", _REUSERS, ids=["mhc", "lite", "identity", "hc", "hc-static"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
def test_reusing_the_gradient_buffer_is_bitwise_and_happens(monkeypatch, variant, dynamic, kernel, g_arg, dt):
    """Every backward of a plain stack on the pair writes its stream gradient into its incoming output
    gradient's buffer (nothing else holds it), and every gradient is bitwise the one of fresh buffers."""
    calls = []
    real = getattr(cpu, kernel)

    def spy(*args, **kwargs):
        g = kwargs.get(g_arg) if isinstance(g_arg, str) else args[g_arg]
        calls.append(kwargs.get("gx_out") is not None and kwargs["gx_out"] is g)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, kernel, spy)
    got = {}
    for on in (True, False):
        hcs, x = _stack(dt, variant=variant, hc_dynamic=dynamic)
        with _reuse(on):
            out = x
            for hc in hcs:
                out = hc(out)
            (out.float().square().sum() + out.float().sum()).backward()
        got[on] = [x.grad] + [p.grad for p in hcs.parameters()]
    assert calls == [True] * 3 + [False] * 3  # every gradient here is a fresh one nobody else holds
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


def _mid_gradients(how: str, on: bool, variant: str = "mhc", dynamic: bool = True):
    """The gradient of the streams between sublayers 1 and 2 as the user sees it, and x's."""
    hcs, x = _stack(variant=variant, hc_dynamic=dynamic)
    with _reuse(on):
        mid = hcs[0](x)
        mid = hcs[1](mid)  # hcs[1]'s write-back output: its gradient reaches hcs[1]'s coefficient backward
        out = hcs[2](mid)
        loss = out.square().sum()
        if how == "hook":
            kept = []  # (its value when the hook saw it, the tensor the hook kept)
            mid.register_hook(lambda g: kept.append((g.clone(), g)))
            loss.backward()
            return kept[0][0], x.grad, kept[0][1]
        if how == "retain_grad":
            mid.retain_grad()
            loss.backward()
            return mid.grad.clone(), x.grad, mid.grad
        if how == "autograd.grad":
            g_mid, g_x = torch.autograd.grad(loss, [mid, x])
            return g_mid.clone(), g_x, g_mid
        if how == "backward(inputs=...)":
            loss.backward(inputs=[mid, x])
            return mid.grad.clone(), x.grad, mid.grad
        if how == "grad passed in":  # the user's own gradient for the last write-back's output
            g = torch.ones_like(out)
            out.backward(g)
            return torch.ones_like(out), x.grad, g
        raise AssertionError(how)


@pytest.mark.parametrize("variant,dynamic", [("mhc", True), ("hc", True), ("hc", False)], ids=["mhc", "hc", "hc-static"])
@pytest.mark.parametrize("how", ["hook", "retain_grad", "autograd.grad", "backward(inputs=...)", "grad passed in"])
def test_a_gradient_the_user_holds_is_not_overwritten(how, variant, dynamic):
    """A stream gradient that a hook kept, that retain_grad or backward(inputs=...) stored, that
    autograd.grad returns or that the user passed to backward is the tensor the next read's backward
    receives (or a copy of it): it must not be reused, and every gradient equals the one computed with
    fresh buffers."""
    seen_on, gx_on, held_on = _mid_gradients(how, True, variant, dynamic)
    seen_off, gx_off, held_off = _mid_gradients(how, False, variant, dynamic)
    assert torch.equal(held_on, seen_on)  # hook: the kept tensor still holds what the hook saw
    assert torch.equal(seen_on, seen_off) and torch.equal(gx_on, gx_off)


def test_two_write_backs_of_one_read_with_the_buffer_reused():
    """The carrier's gradients summed by autograd over two write-backs: a fresh sum, reused or not, the
    same gradients."""
    hc, x, g = _case(4, 16, (2, 3), torch.float32)
    with _reuse(True):
        a = _grads(hc, x, g, twice=True)
    with _reuse(False):
        b = _grads(hc, x, g, twice=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_gx_out_must_match_the_streams():
    x = torch.randn(6, 4, 8)
    k = 24
    phi, bias, gates = torch.randn(32, k) * 0.1, torch.zeros(k), torch.ones(3)
    _, _, _, r, z, _ = cpu.coeffs_fwd(x, phi, bias, gates, 1e-6, 20, True)
    g = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match=r"gx_out: got \(6, 4, 4\)"):
        cpu.coeffs_bwd(x, None, z, r, phi, bias, gates, None, None, None, 20, True, False, g_out=g,
                       gx_out=torch.empty(6, 4, 4))
    gx = cpu.coeffs_bwd(x, None, z, r, phi, bias, gates, None, None, None, 20, True, False, g_out=g)[0]
    g2 = g.clone()
    assert torch.equal(cpu.coeffs_bwd(x, None, z, r, phi, bias, gates, None, None, None, 20, True, False,
                                      g_out=g2, gx_out=g2)[0], gx)


# ---- without autograd (torch.no_grad / inference_mode: evaluation, generation) the pair's kernels run bare


@pytest.mark.parametrize("variant,dynamic", [(v, d) for v, d, *_ in _REUSERS], ids=["mhc", "lite", "identity", "hc",
                                                                                       "hc-static"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_autograd_the_pair_runs_no_function_and_gives_the_same_streams(monkeypatch, variant, dynamic, dt,
                                                                               mode):
    """Evaluation and generation record nothing, so the pair's kernels are called without their autograd
    Functions (each ``apply`` costs several microseconds per sublayer and token): the output streams are
    bitwise those of a forward with autograd on, no Function of the pair runs, and the kernels do."""
    from mhckit.ops import carry

    hcs, x = _stack(dt, variant=variant, hc_dynamic=dynamic)
    x = x.detach()

    def run():
        out = x
        for hc in hcs:
            out = hc(out)
        return out

    with_grad = run()
    assert with_grad.requires_grad
    applied, kernels = [], []
    for fn in (carry.CoeffsCarryFunction, carry.HCCarryFunction, carry.ReadCarryFunction, carry.PostCarryFunction):
        monkeypatch.setattr(fn, "forward", staticmethod(lambda *a, _n=fn.__name__, **k: applied.append(_n)))
    for name in ("coeffs_fwd", "hc_fwd", "pre_fwd", "post_res_fwd"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _r=real, _n=name, **k: kernels.append(_n) or _r(*a, **k))
    with getattr(torch, mode)():
        bare = run()
    assert applied == [] and len(kernels) == 2 * len(hcs), (applied, kernels)
    assert not bare.requires_grad and bare.dtype == dt
    assert torch.equal(bare, with_grad.detach())
