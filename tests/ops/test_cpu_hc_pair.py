"""Hyper-Connections (arXiv 2409.19606) on the C kernels' read / write-back pair: the read of HC's
coefficients (ReadCarryFunction) carries the write-back's output gradient, and its backward makes the
read's and the write-back's stream gradients in one pass (mhckit.ops.cpu.read_bwd). Checked against
the separate ops and mhckit.reference, every gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mhckit.modules import HyperConnection
from mhckit.ops import cpu
from mhckit.ops.carry import separate_ops
from tests.ops.test_cpu_carry import _grads, switched_off_between_forward_and_backward

# the same skip (no compiler, kernels off) and scale-aware comparison as the mHC-lite tests
from tests.ops.test_cpu_lite import _close, _kernels, pytestmark  # noqa: E402, F401


def _case(n, c, lead, dt, seed=0):
    """An HC layer away from its start (every dynamic weight and static term perturbed), streams, a gradient."""
    torch.manual_seed(seed)
    hc = HyperConnection(c, torch.nn.Linear(c, c), variant="hc", n_streams=n).to(dt)
    with torch.no_grad():
        for p in hc.coeffs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
    return hc, x, torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt)


def _reference(hc):
    hc.cfg = hc.coeffs.cfg = dataclasses.replace(hc.cfg, backend="reference")
    return hc


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,lead", [(2, 8, (3,)), (3, 13, (2, 5)), (4, 64, (37,)), (8, 20, (9,))])
def test_hc_layer_takes_the_pair_and_matches_the_separate_ops_and_reference(dt, n, c, lead, kernel_calls):
    hc, x, g = _case(n, c, lead, dt)
    kernel_calls.clear()
    fast = _grads(hc, x, g)
    names = [name for name, _ in kernel_calls]
    assert names == ["mhc_pre_fwd", "mhc_post_res_fwd", "mhc_post_res_bwd", "mhc_read_bwd"], names
    kernel_calls.clear()
    with separate_ops():
        slow = _grads(hc, x, g)
    assert "mhc_read_bwd" not in [name for name, _ in kernel_calls]
    ref = _grads(_reference(hc), x, g)
    for a, b, r in zip(fast, slow, ref):
        _close(a, b, dt)
        _close(a, r, dt)


def test_hc_kernels_switched_off_between_forward_and_backward():
    """ReadCarryFunction's PyTorch fallback gives the same gradients."""
    hc, x, g = _case(3, 12, (7,), torch.float64, seed=2)
    switched_off_between_forward_and_backward(hc, x, g, _grads(hc, x, g), _close)


@pytest.mark.parametrize("use", ["read_only", "two_write_backs", "frozen_x", "frozen_coefficients"])
def test_hc_pair_with_partial_use(use):
    """The read without its write-back (no carried gradient), two write-backs of one read (autograd
    sums the carried gradients), streams or coefficients without gradients: as the reference."""
    dt = torch.float64
    hc, x, g = _case(4, 16, (11,), dt, seed=3)
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
        # read only: no gradient for h_post's terms (None in the reference; zeros where HC's dynamic
        # weights are one concatenated matrix in functional.hc_coeffs)
        return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]

    fast = run(hc)
    for a, b in zip(fast, run(_reference(hc))):
        _close(a, b, dt)


def test_hc_with_bfloat16_streams_keeps_the_separate_ops(kernel_calls):
    hc, x, g = _case(4, 32, (5,), torch.float32)
    hc = hc.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    _grads(hc, xb, g.to(torch.bfloat16))
    assert "mhc_read_bwd" not in [name for name, _ in kernel_calls]
    assert xb.grad is not None and torch.isfinite(xb.grad).all()


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


def test_static_hc_takes_the_pair(kernel_calls):
    """Static HC (hc_dynamic=False): coefficients expanded from [n] / [n, n] parameters, whose
    gradients are the sums over tokens of the pair's dh_pre / dh_res."""
    torch.manual_seed(4)
    hc = HyperConnection(16, torch.nn.Linear(16, 16), variant="hc", n_streams=4, hc_dynamic=False).double()
    with torch.no_grad():
        for p in hc.coeffs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(5, 4, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, 16, dtype=torch.float64)
    fast = _grads(hc, x, g)
    assert "mhc_read_bwd" in [name for name, _ in kernel_calls]
    for a, b in zip(fast, _grads(_reference(hc), x, g)):
        _close(a, b, torch.float64)
