"""The identity variant (h_res = I, the iHC ablation) on the compiled CPU kernels: the coefficient
kernels with ``iters = cpu.IDENTITY`` (no logits for h_res, no h_res written) and HyperConnection's fused
read / write-back pair with it (a write-back given ``h_res = None`` adds the streams unmixed). Checked
against mhckit.reference (forward and every gradient), the separate ops and the PyTorch mirror (the
kernels switched off between forward and backward: in test_cpu_lite.py, with mHC-lite's); under
torch.compile as mHC's custom ops, bitwise the eager step."""

from __future__ import annotations

import pytest
import torch

from mhckit import functional as F
from mhckit.ops import cpu
from mhckit.ops.autograd import _tail_backward
from tests.ops.test_cpu_lite import _case as lite_case
from tests.ops.test_cpu_lite import (_close, bfloat16_pair_as_close_to_float64_as_the_separate_ops,
                                     pair_matches_the_separate_ops_and_reference)

# the same skip (no compiler, kernels off) as the mHC-lite tests
from tests.ops.test_cpu_lite import _kernels, pytestmark  # noqa: E402, F401


def _case(n, c, lead, dt, seed=0):
    return lite_case(n, c, lead, dt, seed, variant="identity")


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 37])
def test_tail_kernel_gives_pre_and_post_and_no_h_res(dt, n, tokens):
    """K = 2n logits: h_pre = sigmoid, h_post = 2 sigmoid, h_res None; dL/da against autograd, and the
    PyTorch mirror's the same (tokens not a multiple of the 16-token blocks)."""
    g = torch.Generator().manual_seed(n * 10 + tokens)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    z, bias, gates = r(tokens, 2 * n).requires_grad_(), r(2 * n), r(3).abs() + 0.5
    gp, gq = r(tokens, n), r(tokens, n)
    h_pre, h_post, h_res = cpu.tail_fwd(z.detach(), bias, gates, n, cpu.IDENTITY)
    assert h_res is None
    gate = torch.cat([gates[0].expand(n), gates[1].expand(n)])
    a = bias + z * gate
    want = (torch.sigmoid(a[:, :n]), 2 * torch.sigmoid(a[:, n:]))
    _close(h_pre, want[0].detach(), dt)
    _close(h_post, want[1].detach(), dt)
    (gz,) = torch.autograd.grad(want, z, [gp, gq])
    g_res = r(tokens, n, n)  # no logits to take it: ignored
    da = cpu.tail_bwd(z.detach(), bias, gates, gp, gq, g_res, n, cpu.IDENTITY)
    assert da.shape == (tokens, 2 * n)
    _close(da * gate, gz, dt)
    _close(_tail_backward(z.detach(), bias, gate, n, cpu.IDENTITY, gp, gq, g_res), da, dt)


def test_write_back_without_h_res_adds_the_streams_unmixed():
    """``h_res = None``: x_new[k] = x[k] + h_post[k] y, not a product with a unit matrix (an Inf in one
    stream stays in that stream: no 0 * Inf = NaN in the others)."""
    x, y, hp = torch.randn(5, 4, 19, dtype=torch.float64), torch.randn(5, 19, dtype=torch.float64), torch.rand(5, 4,
                                                                                                          dtype=torch.float64)
    torch.testing.assert_close(cpu.post_res_fwd(x, y, hp, None), x + hp[..., None] * y[:, None], rtol=0, atol=1e-15)
    x[0, 1, 3] = float("inf")
    out = cpu.post_res_fwd(x, y, hp, None)
    assert out[0, 1, 3] == float("inf")
    assert torch.isfinite(out[0, [0, 2, 3]]).all() and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c,lead", [(2, 8, (3,)), (3, 13, (2, 5)), (4, 64, (37,)), (8, 19, (5,))])
def test_identity_layer_takes_the_pair_and_matches_the_reference(dt, n, c, lead, kernel_calls):
    hc, x, g = _case(n, c, lead, dt)
    carried = hc.coeffs.read_carry(x)
    assert carried is not None and carried[3] is None  # the pair, with no h_res
    fast = pair_matches_the_separate_ops_and_reference(hc, x, g, kernel_calls)
    alpha = [name for name, _ in hc.named_parameters()].index("coeffs.alpha")
    assert fast[2 + alpha][2] == 0 and fast[2 + alpha][:2].abs().min() > 0  # alpha_res scales no logits


def test_identity_with_bfloat16_streams_is_as_close_to_float64_as_the_separate_ops():
    bfloat16_pair_as_close_to_float64_as_the_separate_ops("identity")


def test_identity_pair_refuses_triton_by_name():
    x = torch.randn(2, 4, 8)
    phi, bias, alpha = torch.zeros(32, 8), torch.zeros(8), torch.ones(3)
    with pytest.raises(ValueError, match=r"^iters: the identity \(h_res = I\) runs on the CPU kernels \(got triton"):
        F._mhc_read_carry(x, phi, bias, alpha, iters=cpu.IDENTITY, rms_eps=1e-6, triton=True)
    with pytest.raises(ValueError, match=r"^phi"):  # a wrong shape is named (2n = 8 columns expected)
        F._mhc_read_carry(x, torch.zeros(32, 24), torch.zeros(24), alpha, iters=cpu.IDENTITY, rms_eps=1e-6)


def _identity_gpt(dt):
    from mhckit import MHCConfig
    from mhckit.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, hc=MHCConfig(variant="identity")))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.to(dt)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_identity_gpt_runs_the_pair_as_custom_ops(dt, kernel_calls):
    """Under torch.compile the identity runs on mHC's custom ops (mhckit::carry_read with an empty
    stand-in for h_res, carry_write without h_res), one graph without breaks, the same kernels as eager
    and bitwise its loss and gradients."""
    import re

    import torch._dynamo as dynamo

    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    explained = dynamo.explain(_identity_gpt(dt))(tok[:, :-1], tok[:, 1:])
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert set(re.findall(r"torch\.ops\.mhckit\.(\w+)", explained.graphs[0].code)) == {"carry_read", "carry_write"}
    dynamo.reset()
    model, eager = _identity_gpt(dt), _identity_gpt(dt)
    kernel_calls.clear()
    _, loss_c = torch.compile(model, fullgraph=True, backend="aot_eager")(tok[:, :-1], tok[:, 1:])
    loss_c.backward()
    names = sorted({name for name, _ in kernel_calls})
    assert names == ["mhc_coeffs_bwd", "mhc_coeffs_fwd", "mhc_post_res_bwd", "mhc_post_res_fwd"], names
    _, loss_e = eager(tok[:, :-1], tok[:, 1:])
    loss_e.backward()
    assert torch.equal(loss_c, loss_e)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_compiled_identity_with_the_kernels_switched_off_at_run_time():
    """Traced with the kernels built, run inside cpu.disabled(): the custom ops' PyTorch path, as eager."""
    from tests.conftest import compiled_step_matches_eager

    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with cpu.disabled():
        compiled_step_matches_eager(_identity_gpt(torch.float64), _identity_gpt(torch.float64), tok, atol=1e-12)
