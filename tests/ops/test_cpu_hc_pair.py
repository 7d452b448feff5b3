"""Hyper-Connections (arXiv 2409.19606) on the C kernels' read / write-back pair. Dynamic HC: the
coefficients and the read in one C call each way (HCCarryFunction: mhc_hc_fwd / mhc_hc_bwd, the
write-back's dx and dh_res in the same backward pass). Static HC: the read of its coefficients
(ReadCarryFunction) carries the write-back's output gradient and one pass makes both stream gradients
(mhckit.ops.cpu.read_bwd). Checked against the separate ops and mhckit.reference, every gradient;
dynamic HC also with bf16 / fp16 streams (the half kernels; tests/ops/test_cpu_half.py checks them
bitwise against the float32 kernels), and under torch.compile as the custom ops mhckit::carry_hc_read
(dynamic) / carry_pre_read (static) and carry_write (their PyTorch path, for the kernels switched off at
run time, against the kernels)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mhckit import reference
from mhckit.modules import HyperConnection
from mhckit.ops import cpu
from mhckit.ops.carry import separate_ops
from tests.ops.test_cpu_carry import _grads, switched_off_between_forward_and_backward

# the same skip (no compiler, kernels off) and scale-aware comparison as the mHC-lite tests
from tests.ops.test_cpu_lite import _close, _kernels, pytestmark  # noqa: E402, F401


DYNAMIC = ["mhc_hc_fwd", "mhc_post_res_fwd", "mhc_post_res_bwd", "mhc_hc_bwd"]
STATIC = ["mhc_pre_fwd", "mhc_post_res_fwd", "mhc_post_res_bwd", "mhc_read_bwd"]


def _case(n, c, lead, dt, seed=0, dynamic=True):
    """An HC layer away from its start (every dynamic weight and static term perturbed), streams, a gradient."""
    torch.manual_seed(seed)
    hc = HyperConnection(c, torch.nn.Linear(c, c), variant="hc", n_streams=n, hc_dynamic=dynamic).to(dt)
    with torch.no_grad():
        for p in hc.coeffs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
    return hc, x, torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt)


def _reference(hc):
    hc.cfg = hc.coeffs.cfg = dataclasses.replace(hc.cfg, backend="reference")
    return hc


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,lead", [(2, 8, (3,)), (3, 13, (2, 5)), (4, 64, (37,)), (8, 20, (9,))])
def test_hc_layer_takes_the_pair_and_matches_the_separate_ops_and_reference(dynamic, dt, n, c, lead, kernel_calls):
    hc, x, g = _case(n, c, lead, dt, dynamic=dynamic)
    kernel_calls.clear()
    fast = _grads(hc, x, g)
    names = [name for name, _ in kernel_calls]
    assert names == (DYNAMIC if dynamic else STATIC), names
    kernel_calls.clear()
    with separate_ops():
        slow = _grads(hc, x, g)
    assert not {"mhc_read_bwd", "mhc_hc_fwd", "mhc_hc_bwd"} & {name for name, _ in kernel_calls}
    ref = _grads(_reference(hc), x, g)
    for a, b, r in zip(fast, slow, ref):
        _close(a, b, dt)
        _close(a, r, dt)


@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_kernels_switched_off_between_forward_and_backward(dynamic):
    """HCCarryFunction's and ReadCarryFunction's PyTorch fallbacks give the same gradients."""
    hc, x, g = _case(3, 12, (7,), torch.float64, seed=2, dynamic=dynamic)
    switched_off_between_forward_and_backward(hc, x, g, _grads(hc, x, g), _close)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("use", ["read_only", "two_write_backs", "frozen_x", "frozen_coefficients"])
def test_hc_pair_with_partial_use(use, dynamic):
    """The read without its write-back (no carried gradient), two write-backs of one read (autograd
    sums the carried gradients), streams or coefficients without gradients: as the reference."""
    dt = torch.float64
    hc, x, g = _case(4, 16, (11,), dt, seed=3, dynamic=dynamic)
    if use == "frozen_x":
        x.requires_grad_(False)
    if use == "frozen_coefficients":
        for p in hc.coeffs.parameters():
            p.requires_grad_(False)

    def run(layer):
        leaves = [t for t in (x, *layer.parameters()) if t.requires_grad]
        for t in leaves:
            t.grad = None
        u, finish = layer.split(x)
        y = layer.branch(u)
        if use == "read_only":
            loss = (u * g[..., 0, :]).sum()
        elif use == "two_write_backs":
            loss = ((finish(y) + 0.5 * finish(y.flip(-1))) * g).sum()
        else:
            loss = (finish(y) * g).sum()
        loss.backward()
        return [None if t.grad is None else t.grad.clone() for t in leaves]

    fast, ref = run(hc), run(_reference(hc))
    # read only: no gradient reaches h_post's and h_res's terms; the pair leaves them None, as the
    # reference does (not zeros: an optimizer skips a parameter without a gradient, weight decay included)
    if cpu.status()["active"]:
        assert [a is None for a in fast] == [b is None for b in ref]
    if use == "read_only":
        names = [name for name, t in hc.named_parameters() if t.requires_grad]
        unreached = {name for name, b in zip(names, ref[1:]) if b is None and name.startswith("coeffs.")}
        assert unreached == {f"coeffs.{p}" for p in ("static_post", "static_res") + (
            ("w_post", "w_res", "scale_beta") if dynamic else ())}, unreached
    for a, b in zip(fast, ref):
        if a is not None and b is not None:
            _close(a, b, dt)
        elif a is not None or b is not None:  # one None (kernels off): the other all zeros
            assert (a if a is not None else b).abs().max() == 0


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_hc_with_half_streams_takes_the_pair_within_twice_the_separate_ops_error(dt, dynamic, kernel_calls):
    """bf16 / fp16 streams (and parameters, as in a model cast with .to(dt)): HC runs the pair on the
    half kernels with float32 coefficients (static HC: its coefficients cast to float32 for the read's
    backward); DESIGN.md's rule: every result's error against the float64 layer at most twice that of
    the separate ops (plus a float32-sized floor)."""
    if str(dt) not in cpu.status()["half_streams"]:
        pytest.skip(f"this build of the kernels has no {dt} streams")
    hc64, x64, g64 = _case(4, 32, (29,), torch.float64, seed=4, dynamic=dynamic)
    truth = _grads(hc64, x64, g64)
    hc = _case(4, 32, (29,), torch.float64, seed=4, dynamic=dynamic)[0].to(dt)
    x, g = x64.detach().to(dt).requires_grad_(), g64.to(dt)
    kernel_calls.clear()
    fast = _grads(hc, x, g)
    assert kernel_calls == [(name, dt) for name in (DYNAMIC if dynamic else STATIC)], kernel_calls
    with separate_ops():
        slow = _grads(hc, x, g)
    for name, a, b, t in zip(["out", "x"] + [n for n, _ in hc.named_parameters()], fast, slow, truth):
        err_fast, err_slow = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err_fast <= 2 * err_slow + 1e-6 * t.abs().max().item(), (name, err_fast, err_slow)


@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_half_kernels_switched_off_between_forward_and_backward(dynamic):
    """The fallbacks (dynamic: autograd through the reference; static: the read's PyTorch sums) take bf16
    streams with the float32 parameters / coefficients the pair casts to: the same gradients to about
    one bf16 rounding."""
    hc, x, g = _case(3, 12, (7,), torch.float64, seed=2, dynamic=dynamic)
    hc, x, g = hc.to(torch.bfloat16), x.detach().to(torch.bfloat16).requires_grad_(), g.to(torch.bfloat16)

    def close(a, b, dt):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2 ** -7 * b.abs().max().item())

    switched_off_between_forward_and_backward(hc, x, g, _grads(hc, x, g), close)


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c", [(1, 7), (3, 13), (4, 64), (8, 20)])
def test_read_bwd_kernel_matches_pytorch_ops(dt, n, c):
    gen = torch.Generator().manual_seed(n * 31 + c)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
    x, hp, gu, g = r(6, n, c), r(6, n), r(6, c), r(6, n, c)
    hr = r(6, n, n).transpose(-1, -2)  # strided, as HC's h_res
    want_x = hp[..., :, None] * gu[..., None, :] + torch.einsum("tkj,tkc->tjc", hr, g)
    gx, gp, gr = cpu.read_bwd(x, hp, hr, gu, g, True, True, True)
    _close(gx, want_x, dt)
    _close(gp, torch.einsum("tc,tjc->tj", gu, x), dt)
    _close(gr, torch.einsum("tkc,tjc->tkj", g, x), dt)
    gx, gp, gr = cpu.read_bwd(x, hp, hr, None, g, True, True, True)  # no read gradient: no dh_pre
    assert gp is None
    _close(gx, torch.einsum("tkj,tkc->tjc", hr, g), dt)
    gx, gp, gr = cpu.read_bwd(x, hp, hr, gu, None, True, True, True)  # no write-back: no dh_res
    assert gr is None
    _close(gx, hp[..., :, None] * gu[..., None, :], dt)
    x[0, 0, 0] = float("inf")  # x is not read for dx (no 0 * inf)
    assert torch.isfinite(cpu.read_bwd(x, hp, hr, gu, g, True, False, False)[0]).all()


def _reference_grads(x, params, grads, dt):
    """``[u, h_pre, h_post, h_res]`` and the gradients of every input through mhckit.reference in ``dt``
    (with the write-back's x-side ``h_res x`` under the output gradient ``grads[-1]``)."""
    leaves = [t.to(dt).clone().requires_grad_() for t in [x, *params]]
    h = reference.hc_coeffs(leaves[0], *leaves[1:], norm_eps=1e-6)
    u = reference.mhc_pre(leaves[0], h[0])
    gu, gp, gq, gr, go = (g.to(dt) for g in grads)
    wb = torch.einsum("tkj,tjc->tkc", h[2], leaves[0])
    loss = (u * gu).sum() + (h[0] * gp).sum() + (h[1] * gq).sum() + (h[2] * gr).sum() + (wb * go).sum()
    wx, wsp, wspo, wsr, wwp, wwq, wwr, wsa, wsb = torch.autograd.grad(loss, leaves)
    outs = [u.detach(), *(t.detach() for t in h)]
    return outs + [wx, wwp, wwq, wwr, wsp, wspo, wsr, wsa, wsb]


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,scale", [(1, 7, 1.0), (4, 64, 0.01), (4, 67, 3.0), (8, 20, 30.0)])
def test_hc_kernels_match_autograd_through_the_reference(dt, n, c, scale):
    """mhc_hc_fwd / mhc_hc_bwd against autograd through mhckit.reference: n = 1, widths with vector
    tails, z near 0 (tanh's polynomial branch, scale 0.01), around 1 and saturated (scale 30). float32:
    DESIGN.md's rule, error against the float64 reference at most twice the float32 reference's (where
    tanh saturates, 1 - t^2 cancels in float32 in both)."""
    gen = torch.Generator().manual_seed(n * 13 + c)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = r(9, n, c)
    params = [r(n), r(n), r(n, n), r(c) * scale, r(c) * scale, r(c, n) * scale, r(()).abs() + 0.5, r(()).abs() + 0.5]
    grads = [r(9, c), r(9, n), r(9, n), r(9, n, n), r(9, n, c)]
    xd, pd, gd = x.to(dt), [p.to(dt) for p in params], [g.to(dt) for g in grads]
    sp, spo, sr, wp, wq, wr, sa, sb = pd
    u, h_pre, h_post, h_res, z, rr = cpu.hc_fwd(xd, wp, wq, wr, sp, spo, sr, sa, sb, 1e-6)
    gx, *dparams = cpu.hc_bwd(xd, gd[0], gd[4], z, rr, wp, wq, wr, sp, sr, sa, sb, *gd[1:4], True)
    got = [u, h_pre, h_post, h_res, gx, *dparams]
    assert [d.shape for d in dparams] == [p.shape for p in (wp, wq, wr, sp, spo, sr, sa, sb)]
    truth = _reference_grads(x, params, grads, torch.float64)
    if dt == torch.float64:
        for a, b in zip(got, truth):
            _close(a, b, dt)
        return
    ref32 = _reference_grads(x, params, grads, torch.float32)
    for i, (a, b, t) in enumerate(zip(got, ref32, truth)):
        err, err_ref = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        # floor: float32 rounding of the projection's terms, which grow with the weights (z = <x_j, w> / r
        # sums terms ~scale times larger than z where they cancel)
        assert err <= 2 * err_ref + 1e-6 * (1 + scale) * t.abs().max().item(), (i, err, err_ref)


@pytest.mark.parametrize("used", ["h_pre", "h_post", "h_res", "u"])
def test_hc_pair_with_one_coefficient_differentiated(used):
    """A loss on one output of the dynamic pair alone: every gradient that reaches (the streams' through
    that coefficient too) as autograd through the reference, None where none reaches."""
    from mhckit import functional as F

    hc, x, _ = _case(3, 16, (5,), torch.float64, seed=6)
    c = hc.coeffs
    params = [c.static_pre, c.static_post, c.static_res, c.w_pre, c.w_post, c.w_res, c.scale_alpha, c.scale_beta]
    gen = torch.Generator().manual_seed(7)

    def run(fn):
        for t in [x, *params]:
            t.grad = None
        outs = dict(zip(["u", "h_pre", "h_post", "h_res"], fn()))
        (outs[used] * torch.randn(outs[used].shape, generator=gen.manual_seed(7), dtype=x.dtype)).sum().backward()
        return [None if t.grad is None else t.grad.clone() for t in [x, *params]]

    fast = run(lambda: F._hc_read_carry(x, *params, norm_eps=hc.cfg.rms_eps)[:4])

    def reference_outputs():
        h = reference.hc_coeffs(x, *params, norm_eps=hc.cfg.rms_eps)
        return (reference.mhc_pre(x, h[0]), *h)

    ref = run(reference_outputs)
    assert [a is None for a in fast] == [b is None for b in ref]
    assert fast[0] is not None  # the streams get a gradient through any coefficient
    for a, b in zip(fast, ref):
        if a is not None:
            _close(a, b, torch.float64)


def _hc_gpt(dt, dynamic=True):
    from mhckit import MHCConfig
    from mhckit.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    hc = MHCConfig(variant="hc", hc_dynamic=dynamic)
    m = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, hc=hc))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.to(dt)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_hc_gpt_runs_the_pair_as_custom_ops(dt, dynamic, kernel_calls):
    """Under torch.compile HC's read is a custom op, mhckit::carry_hc_read (dynamic: the C calls of
    HCCarryFunction) or mhckit::carry_pre_read (static: ReadCarryFunction's), and its write-back
    mhckit::carry_write, one graph without breaks; the compiled step calls the same kernels as eager
    and gives bitwise its loss and gradients."""
    import re

    import torch._dynamo as dynamo

    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    explained = dynamo.explain(_hc_gpt(dt, dynamic))(tok[:, :-1], tok[:, 1:])
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    read = "carry_hc_read" if dynamic else "carry_pre_read"
    assert set(re.findall(r"torch\.ops\.mhckit\.(\w+)", explained.graphs[0].code)) == {read, "carry_write"}

    dynamo.reset()
    model, eager = _hc_gpt(dt, dynamic), _hc_gpt(dt, dynamic)
    kernel_calls.clear()
    _, loss_c = torch.compile(model, fullgraph=True, backend="aot_eager")(tok[:, :-1], tok[:, 1:])
    loss_c.backward()
    compiled_calls = sorted({name for name, _ in kernel_calls})
    assert compiled_calls == sorted(DYNAMIC if dynamic else STATIC), compiled_calls
    _, loss_e = eager(tok[:, :-1], tok[:, 1:])
    loss_e.backward()
    assert torch.equal(loss_c, loss_e)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("dynamic", [True, False])
def test_compiled_hc_with_the_kernels_switched_off_at_run_time(dynamic):
    """Traced with the kernels built, run inside cpu.disabled(): the custom ops do the same sums in
    PyTorch ops (dynamic: the chain rule written out in carry_ops._hc_backward_torch), as eager without
    kernels."""
    from tests.conftest import compiled_step_matches_eager

    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with cpu.disabled():
        compiled_step_matches_eager(_hc_gpt(torch.float64, dynamic), _hc_gpt(torch.float64, dynamic), tok,
                                    atol=1e-12)


@pytest.mark.parametrize("none", [(), ("g_u",), ("g_out",)])
@pytest.mark.parametrize("n,c", [(1, 7), (4, 64), (8, 20)])
def test_static_hc_custom_ops_pytorch_path_matches_the_kernels(n, c, none):
    """mhckit::carry_pre_read and its backward: the PyTorch path (kernels off at run time) against the
    kernels in float64, with either incoming gradient absent (zeros where nothing reaches)."""
    from mhckit.ops import carry_ops

    gen = torch.Generator().manual_seed(n * 5 + c)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, h_pre, h_res = r(5, 3, n, c), r(5, 3, n), r(5, 3, n, n)
    fast = carry_ops.carry_pre_read(x, h_pre, h_res)[0]
    with cpu.disabled():
        slow = carry_ops.carry_pre_read(x, h_pre, h_res)[0]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    g_u, g_out = (None if "g_u" in none else r(5, 3, c)), (None if "g_out" in none else r(5, 3, n, c))
    fast = carry_ops.carry_pre_read_backward(x, h_pre, h_res, g_u, g_out)
    with cpu.disabled():
        slow = carry_ops.carry_pre_read_backward(x, h_pre, h_res, g_u, g_out)
    for a, b, p in zip(fast, slow, (x, h_pre, h_res)):
        assert a.shape == b.shape == p.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fast[1].abs().max() > 0 if g_u is not None else not fast[1].any()
    assert fast[2].abs().max() > 0 if g_out is not None else not fast[2].any()


@pytest.mark.parametrize("none", [(), ("g_u",), ("g_pre", "g_res"), ("g_out",), ("g_u", "g_pre", "g_post", "g_out")])
@pytest.mark.parametrize("n,c", [(1, 7), (3, 13), (4, 64), (8, 20)])
def test_hc_custom_ops_pytorch_path_matches_the_kernels(n, c, none):
    """The custom ops' PyTorch path (kernels off at run time) against the kernels in float64, forward
    (u, the coefficients, and r, z, which the kernels' backward reads) and every gradient, with any of
    the incoming gradients absent."""
    from mhckit.ops import carry_ops

    gen = torch.Generator().manual_seed(n * 7 + c)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = r(5, 3, n, c)
    sp, spo, sr, wp, wq, wr, sa, sb = r(n), r(n), r(n, n), r(c), r(c), r(c, n), r(()).abs() + 0.5, r(()).abs() + 0.5
    args = (x, sp, spo, sr, wp, wq, wr, sa, sb, 1e-6)
    fast = carry_ops._hc_read(*args)
    with cpu.disabled():
        slow = carry_ops._hc_read(*args)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, _, _, _, rr, z = fast
    grads = {"g_u": r(5, 3, c), "g_pre": r(5, 3, n), "g_post": r(5, 3, n), "g_res": r(5, 3, n, n),
             "g_out": r(5, 3, n, c)}
    grads = {k: (None if k in none else v) for k, v in grads.items()}
    bwd = (x, rr, z, sp, spo, sr, wp, wq, wr, sa, sb, *grads.values(), 1e-6)
    fast = carry_ops.carry_hc_read_backward(*bwd)
    with cpu.disabled():
        slow = carry_ops.carry_hc_read_backward(*bwd)
    for a, b, p in zip(fast, slow, (x, sp, spo, sr, wp, wq, wr, sa, sb)):
        assert a.shape == b.shape == p.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernels", [True, False])
def test_pair_custom_ops_pass_opcheck(kernels):
    """Every custom op of the pair (mHC's, the identity's, dynamic and static HC's reads and backward ops,
    the write-back) against its fake: schema, output shapes / dtypes / strides (an inductor graph asserts
    them: the HC read's PyTorch path once returned h_res transposed and a compiled step with the kernels
    switched off failed), autograd registration; with the kernels on and switched off at run time."""
    import contextlib

    from mhckit.ops import carry_ops

    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    n, c = 4, 16
    x = r(2, 3, n, c)
    sp, spo, sr, wp, wq, wr, sa, sb = r(n), r(n), r(n, n), r(c), r(c), r(c, n), torch.tensor(0.5), torch.tensor(0.7)
    h_pre, h_res, g_u, g_out = r(2, 3, n), r(2, 3, n, n), r(2, 3, c), r(2, 3, n, c)
    phi, bias, alpha = r(n * c, 2 * n) * 0.1, r(2 * n), torch.rand(3, generator=gen) + 0.2
    _, _, _, _, rr, z, _ = carry_ops.carry_hc_read(x, sp, spo, sr, wp, wq, wr, sa, sb, 1e-6)
    cases = [
        (carry_ops.carry_hc_read, (x, sp, spo, sr, wp, wq, wr, sa, sb, 1e-6)),
        (carry_ops.carry_hc_read_backward, (x, rr, z, sp, spo, sr, wp, wq, wr, sa, sb, g_u, None, r(2, 3, n), None,
                                            g_out, 1e-6)),
        (carry_ops.carry_pre_read, (x, h_pre, h_res)),
        (carry_ops.carry_pre_read_backward, (x, h_pre, h_res, g_u, None)),
        (carry_ops.carry_read, (x, phi, bias, alpha, cpu.IDENTITY, 1e-6, False)),
        (carry_ops.carry_write, (x, x, g_u, h_pre, None, False)),
    ]
    with contextlib.nullcontext() if kernels else cpu.disabled():
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
