"""mHC-lite (arXiv 2601.05732) on the compiled CPU kernels: the coefficient kernels' permutation-mixture
tail (``iters = cpu.PERMUTATIONS``) and HyperConnection's fused read / write-back pair with it. Checked
against mhckit.reference (forward and every gradient), the separate ops, the PyTorch mirror and under
torch.compile."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import shutil

import pytest
import torch

from mhckit import MHCConfig, reference
from mhckit import functional as F
from mhckit.models import GPT, GPTConfig
from mhckit.ops import cpu
from mhckit.ops.autograd import _permutation_mixture, _tail_backward
from mhckit.ops.carry import separate_ops
from tests.ops.test_cpu_carry import _layer as carry_layer
from tests.ops.test_cpu_carry import switched_off_between_forward_and_backward

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler: no compiled CPU kernels"
)


@pytest.fixture(autouse=True)
def _kernels():
    if not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")


def _close(a, b, dt):
    """fp32: elementwise 2e-5 plus 2e-6 of the tensor's largest magnitude (entries that cancel: sums of
    32 logit-gradient terms per stream element at n = 4)."""
    scale = max(1.0, b.abs().max().item())
    tol = dict(rtol=2e-5, atol=2e-6 * scale) if dt == torch.float32 else dict(rtol=1e-12, atol=1e-13 * scale)
    torch.testing.assert_close(a, b, **tol)


def _perms(n, dt):
    eye = torch.eye(n, dtype=dt)
    return torch.stack([eye[list(p)] for p in itertools.permutations(range(n))])


def _tail_reference(z, bias, gates, n):
    """``(h_pre, h_post, h_res)`` of the lite tail with reference ops (autograd-able in z)."""
    k = z.shape[-1]
    gate = torch.cat([gates[0].expand(n), gates[1].expand(n), gates[2].expand(k - 2 * n)])
    a = bias + z * gate
    return (torch.sigmoid(a[:, :n]), 2 * torch.sigmoid(a[:, n : 2 * n]),
            reference.permutation_mixture(a[:, 2 * n :], _perms(n, z.dtype)))


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens,scale", [(1, 1.0), (37, 1.0), (16, 30.0)])
def test_tail_kernel_matches_the_reference(dt, n, tokens, scale):
    """Forward, and dL/da through gates, sigmoids and the softmax of the mixture, against autograd
    through the reference; ``tokens`` not a multiple of the 16-token blocks; large logits (scale 30)."""
    g = torch.Generator().manual_seed(n * 100 + tokens)
    k = 2 * n + math.factorial(n)
    z = (torch.randn(tokens, k, generator=g, dtype=torch.float64) * scale).to(dt).requires_grad_()
    bias = torch.randn(k, generator=g, dtype=torch.float64).to(dt)
    gates = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(dt)
    grads = [torch.randn(tokens, w, generator=g, dtype=torch.float64).to(dt) for w in (n, n, n * n)]
    got = cpu.tail_fwd(z.detach(), bias, gates, n, cpu.PERMUTATIONS)
    want = _tail_reference(z, bias, gates, n)
    for a, b in zip(got, want):
        _close(a.reshape(b.shape), b.detach(), dt)
    # dL/da: the kernel returns the gradient with respect to a = bias + gate * z
    (gz,) = torch.autograd.grad(want, z, [grads[0], grads[1], grads[2].reshape(-1, n, n)])
    gate = torch.cat([gates[0].expand(n), gates[1].expand(n), gates[2].expand(k - 2 * n)])
    da = cpu.tail_bwd(z.detach(), bias, gates, *grads, n, cpu.PERMUTATIONS)
    _close(da * gate, gz, dt)
    # and the PyTorch mirror of the same (used when the kernels are switched off)
    mirror = _tail_backward(z.detach(), bias, gate, n, cpu.PERMUTATIONS, *grads)
    _close(mirror, da, dt)
    a_res = (bias + z.detach() * gate)[:, 2 * n :]
    _close(_permutation_mixture(a_res, n), want[2].detach(), dt)


def test_tail_kernel_rows_and_columns_sum_to_one_and_refuse_n_beyond_four():
    n, k = 4, 8 + 24
    z = torch.randn(256, k) * 3
    bias = torch.zeros(k)
    _, _, h_res = cpu.tail_fwd(z, bias, torch.ones(3), n, cpu.PERMUTATIONS)
    one = torch.ones(256, n)
    torch.testing.assert_close(h_res.sum(-1), one, rtol=0, atol=3e-7)
    torch.testing.assert_close(h_res.sum(-2), one, rtol=0, atol=3e-7)
    assert (h_res >= 0).all()
    with pytest.raises(RuntimeError, match=r"code 1"):  # 5! = 120 logits: not in the kernels
        cpu.tail_fwd(torch.zeros(3, 130), torch.zeros(130), torch.ones(3), 5, cpu.PERMUTATIONS)


def _layer(n, c, dt, seed=0, variant="mhc-lite"):
    """An mHC-lite (or ``variant``) layer away from its start (random phi, bias, alpha)."""
    return carry_layer(n, c, dt, seed, variant=variant)


def _grads(hc, x, g):
    for p in [x, *hc.parameters()]:
        p.grad = None
    out = hc(x)
    out.backward(g)
    return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in hc.parameters()]


def _case(n, c, lead, dt, seed=0, variant="mhc-lite"):
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
    return _layer(n, c, dt, seed, variant), x, torch.randn(*lead, n, c, generator=gen, dtype=torch.float64).to(dt)


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,lead", [(2, 8, (3,)), (3, 13, (2, 5)), (4, 64, (37,)), (4, 19, (5,))])
def test_lite_layer_takes_the_pair_and_matches_the_reference(dt, n, c, lead, kernel_calls):
    hc, x, g = _case(n, c, lead, dt)
    assert hc.coeffs.read_carry(x) is not None  # the pair with the permutation tail
    pair_matches_the_separate_ops_and_reference(hc, x, g, kernel_calls)


def pair_matches_the_separate_ops_and_reference(hc, x, g, kernel_calls) -> list:
    """The layer on the pair (its four kernel calls) against the separate ops and the reference backend:
    output and every gradient; returns the pair's (``_grads``' list)."""
    kernel_calls.clear()
    fast = _grads(hc, x, g)
    assert [name for name, _ in kernel_calls] == ["mhc_coeffs_fwd", "mhc_post_res_fwd", "mhc_post_res_bwd",
                                                  "mhc_coeffs_bwd"]
    with separate_ops():
        assert hc.coeffs.read_carry(x) is None
        slow = _grads(hc, x, g)
    hc.cfg = hc.coeffs.cfg = dataclasses.replace(hc.cfg, backend="reference")
    assert hc.coeffs.read_carry(x) is None
    ref = _grads(hc, x, g)
    for a, b, r in zip(fast, slow, ref):
        _close(a, b, x.dtype)
        _close(a, r, x.dtype)
    return fast


def bfloat16_pair_as_close_to_float64_as_the_separate_ops(variant):
    """DESIGN.md's rule for reduced precision: the error of ``variant``'s pair on bf16 streams against
    the float64 reference at most twice that of the separate ops it replaces (plus a float32-sized floor)."""
    hc64, x64, g64 = _case(4, 64, (29,), torch.float64, seed=3, variant=variant)
    truth = _grads(hc64, x64, g64)
    hc = _layer(4, 64, torch.float64, seed=3, variant=variant).to(torch.bfloat16)
    x = x64.detach().to(torch.bfloat16).requires_grad_()
    g = g64.to(torch.bfloat16)
    assert hc.coeffs.read_carry(x) is not None
    fast = _grads(hc, x, g)
    with separate_ops():
        slow = _grads(hc, x, g)
    for name, a, b, t in zip(["out", "x"] + [name for name, _ in hc.named_parameters()], fast, slow, truth):
        err_fast = (a.double() - t).abs().max().item()
        err_slow = (b.double() - t).abs().max().item()
        assert err_fast <= 2 * err_slow + 1e-6 * t.abs().max().item(), (name, err_fast, err_slow)


def test_lite_layer_with_bfloat16_streams_is_as_close_to_float64_as_the_separate_ops():
    bfloat16_pair_as_close_to_float64_as_the_separate_ops("mhc-lite")


def test_lite_with_five_streams_takes_the_separate_ops():
    hc, x, g = _case(5, 8, (3,), torch.float64)
    assert hc.coeffs.read_carry(x) is None
    fast = _grads(hc, x, g)
    hc.cfg = hc.coeffs.cfg = dataclasses.replace(hc.cfg, backend="reference")
    for a, b in zip(fast, _grads(hc, x, g)):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("variant", ["mhc-lite", "identity"])
def test_pair_kernels_switched_off_between_forward_and_backward(variant):
    """The pair's PyTorch fallback (the mirror's permutation tail; for the identity the mirror without
    h_res) gives the same gradients."""
    hc, x, g = _case(3, 12, (7,), torch.float64, seed=2, variant=variant)
    switched_off_between_forward_and_backward(hc, x, g, _grads(hc, x, g), _close)


def test_lite_pair_refuses_triton_and_wide_n_by_name():
    x = torch.randn(2, 4, 8)
    phi, bias, alpha = torch.zeros(32, 32), torch.zeros(32), torch.ones(3)
    with pytest.raises(ValueError, match=r"^n_streams: the permutation mixture runs on the CPU kernels with n <= 4"):
        F._mhc_read_carry(x, phi, bias, alpha, iters=cpu.PERMUTATIONS, rms_eps=1e-6, triton=True)
    with pytest.raises(ValueError, match=r"^phi"):  # a wrong shape is named (n! + 2n = 32 columns expected)
        F._mhc_read_carry(x, torch.zeros(32, 24), bias, alpha, iters=cpu.PERMUTATIONS, rms_eps=1e-6)


def test_compiled_lite_gpt_runs_the_kernels_as_custom_ops(kernel_calls):
    import torch._dynamo as dynamo

    from tests.conftest import compiled_step_matches_eager

    def model():
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, hc=MHCConfig(variant="mhc-lite")))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return m

    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    explained = dynamo.explain(model())(tok[:, :-1], tok[:, 1:])
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = set(re.findall(r"torch\.ops\.mhckit\.(\w+)", explained.graphs[0].code))
    assert ops == {"carry_read", "carry_write"}, ops
    kernel_calls.clear()
    compiled_step_matches_eager(model(), model(), tok)
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd"} <= {name for name, _ in kernel_calls}
