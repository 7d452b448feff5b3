"""HyperConnection, expansion, reduction and initialisation presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mhckit
from mhckit import HyperConnection, MHCConfig, expand_streams, reduce_streams
from mhckit.models import GPT, GPTConfig

C = 16
STREAM_VARIANTS = ["hc", "mhc", "mhc-lite", "identity"]


class Block(nn.Module):
    """A pre-norm MLP branch: y = W2 gelu(W1 rmsnorm(u))."""

    def __init__(self, dim: int = C):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.w1, self.w2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, u):
        return self.w2(torch.nn.functional.gelu(self.w1(self.norm(u))))


def residual_stack(blocks, h):
    for b in blocks:
        h = h + b(h)
    return h


def hc_stack(blocks, h, **kw):
    hcs = [HyperConnection(C, b, layer_index=i, **kw) for i, b in enumerate(blocks)]
    x = expand_streams(h, hcs[0].n_streams)
    for hc in hcs:
        x = hc(x)
    return reduce_streams(x, "mean"), hcs


def test_residual_variant_is_bit_exact():
    blocks = [Block() for _ in range(4)]
    h = torch.randn(3, 5, C)
    out, hcs = hc_stack(blocks, h, variant="residual", n_streams=4)
    assert hcs[0].n_streams == 1 and all(hc.coeffs is None for hc in hcs)
    assert torch.equal(out, residual_stack(blocks, h))
    assert sum(p.numel() for hc in hcs for p in hc.parameters()) == sum(p.numel() for b in blocks for p in b.parameters())


@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_one_stream_is_bit_exact_residual(variant):
    blocks = [Block() for _ in range(3)]
    h = torch.randn(2, 4, C)
    out, _ = hc_stack(blocks, h, variant=variant, n_streams=1)
    assert torch.equal(out, residual_stack(blocks, h))


@pytest.mark.parametrize("init", ["preserving", "mean-preserving"])
@pytest.mark.parametrize("variant", STREAM_VARIANTS)
@pytest.mark.parametrize("n", [2, 4])
def test_function_preserving_start_reproduces_residual_stack(variant, n, init):
    torch.manual_seed(n)
    blocks = [Block() for _ in range(6)]
    h = torch.randn(4, 8, C)
    out, hcs = hc_stack(blocks, h, variant=variant, n_streams=n, init=init)
    torch.testing.assert_close(out, residual_stack(blocks, h), rtol=1e-6, atol=1e-6)
    # and not trivially: the streams were really mixed by non-identity h_res (except hc / identity)
    if variant in ("mhc", "mhc-lite"):
        h_res = hcs[0].coefficients(expand_streams(h, n))[2]
        assert (h_res - torch.eye(n)).abs().max() > 0.03


def test_preserving_pre_weights_sum_to_one_and_post_is_one():
    hc = HyperConnection(C, Block(), n_streams=4, layer_index=6, init="preserving")
    h_pre, h_post, h_res = hc.coefficients(torch.randn(3, 4, C))
    torch.testing.assert_close(h_pre.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(h_post, torch.ones(3, 4))
    assert h_pre[0].argmax().item() == 6 % 4  # the home stream


def test_mean_preserving_reads_the_mean_and_writes_unequally():
    hc = HyperConnection(C, Block(), n_streams=4, layer_index=6)  # the default start
    assert hc.cfg.init == "mean-preserving"
    h_pre, h_post, _ = hc.coefficients(torch.randn(3, 4, C))
    torch.testing.assert_close(h_pre, torch.full((3, 4), 0.25))
    torch.testing.assert_close(h_post.mean(-1), torch.ones(3))
    assert h_post[0].argmax().item() == 6 % 4 and h_post[0].max() > 1.4


def test_streams_diverge_only_under_mean_preserving_start():
    """Under "preserving" the streams stay copies (cosine 1): the model cannot use its width until gradients
    separate them. Under "mean-preserving" they differ after the first sublayer, with the same mean."""
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    h = torch.randn(2, 5, C)
    spread = {}
    for init in ("preserving", "mean-preserving"):
        hcs = [HyperConnection(C, b, n_streams=4, layer_index=i, init=init) for i, b in enumerate(blocks)]
        x = expand_streams(h, 4)
        for hc in hcs:
            x = hc(x)
        spread[init] = (x - x.mean(-2, keepdim=True)).abs().max().item()
    assert spread["preserving"] < 1e-5 < 0.1 < spread["mean-preserving"]


def test_hc_identity_init_is_exact_pre_norm_equivalent():
    hc = HyperConnection(C, Block(), n_streams=4, variant="hc", layer_index=5)
    h_pre, h_post, h_res = hc.coefficients(torch.randn(2, 4, C))
    assert torch.equal(h_pre, torch.eye(4)[1].expand(2, 4))
    assert torch.equal(h_post, torch.ones(2, 4))
    assert torch.equal(h_res, torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("backend,kernels,path", [("auto", True, "c"), ("torch", True, "c"), ("auto", False, "function"),
                                                   ("reference", True, None)])
def test_hc_sublayer_takes_the_fast_dynamic_path(monkeypatch, backend, kernels, path):
    """HyperConnection(variant="hc") computes its dynamic terms on the compiled CPU kernels
    (HCCarryFunction) where they run, else with the one-Function fast path (no normalised copy of the
    streams), and with neither on backend="reference"; all give the same layer output."""
    import contextlib

    from mhckit.ops import autograd, carry, cpu

    from mhckit.ops.cpu import _pair

    calls = []
    for name, cls in (("c", carry.HCCarryFunction), ("function", autograd.HCDynamicFunction)):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    if kernels and _pair.load():  # the C kernels' path as the C++ Function (mhckit/ops/cpu/_pair.py)
        real_cpp = _pair._STATE["hc"]
        monkeypatch.setitem(_pair._STATE, "hc", lambda *a, _r=real_cpp: calls.append("c") or _r(*a))
    torch.manual_seed(0)
    hc = HyperConnection(C, Block(), n_streams=4, variant="hc", layer_index=1, backend=backend)
    with torch.no_grad():
        for w in (hc.coeffs.w_pre, hc.coeffs.w_post, hc.coeffs.w_res):
            w.normal_(0, 0.3)
    x = torch.randn(3, 5, 4, C)
    if path == "c" and not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")
    with contextlib.nullcontext() if kernels else cpu.disabled():
        out = hc(x)
    assert calls == ([path] if path else []), calls
    ref = HyperConnection(C, hc.branch, n_streams=4, variant="hc", layer_index=1, backend="reference")
    ref.load_state_dict(hc.state_dict())
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)


def _train_h_res(init: str, steps: int = 30) -> tuple[float, float]:
    """Train a tiny GPT; return the largest change of any sublayer's h_res bias and of its h_res."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=16, n_layer=2, n_head=2, d_model=32, hc=MHCConfig(variant="mhc", init=init))
    model = GPT(cfg)
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    probe = torch.randn(2, 4, 32)
    bias0 = [hc.coeffs.bias[8:].detach().clone() for hc in hcs]
    h_res0 = [hc.coefficients(probe)[2].detach() for hc in hcs]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tok = torch.randint(0, 32, (8, 17), generator=gen)
        _, loss = model(tok[:, :-1], tok[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    d_bias = max((hc.coeffs.bias[8:] - b).abs().max().item() for hc, b in zip(hcs, bias0))
    d_res = max((hc.coefficients(probe)[2] - h).abs().max().item() for hc, h in zip(hcs, h_res0))
    return d_bias, d_res


def test_default_init_h_res_learns():
    """Users report h_res frozen at identity. Under the default start its bias moves and h_res itself
    changes; under the saturated public-code start (off-diagonal logits -8) Adam moves the bias too,
    but h_res barely changes. The test can fail: it compares the two."""
    d_bias, d_res = _train_h_res(MHCConfig().init)
    _, d_res_saturated = _train_h_res("identity")
    assert d_bias > 0.05, d_bias
    assert d_res > 5e-3, d_res
    assert d_res > 20 * d_res_saturated, (d_res, d_res_saturated)


def test_split_equals_forward_and_passes_extra_args():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Block()

        def forward(self, u, scale=1.0):
            return self.inner(u) * scale, "aux"

    hc = HyperConnection(C, Scaled(), n_streams=3, variant="mhc")
    with torch.no_grad():
        hc.coeffs.phi.normal_(std=0.1)
    x = torch.randn(2, 3, C)
    out, aux = hc(x, scale=0.5)
    u, finish = hc.split(x)
    assert aux == "aux"
    assert torch.equal(out, finish(hc.branch(u, scale=0.5)[0]))


def test_h_res_matters_when_streams_are_expanded_once():
    """Expanding once per model lets h_res act (a package that expands per block makes it inert)."""
    torch.manual_seed(1)
    blocks = [Block() for _ in range(3)]
    hcs = [HyperConnection(C, b, n_streams=4, layer_index=i) for i, b in enumerate(blocks)]
    x0 = expand_streams(torch.randn(2, C), 4)

    def run():
        x = x0
        for hc in hcs:
            x = hc(x)
        return reduce_streams(x, "mean")

    with torch.no_grad():  # the default start makes the streams differ; a non-uniform read lets h_res matter
        for hc in hcs:
            hc.coeffs.bias[:4] = torch.randn(4)
    base = run()
    with torch.no_grad():
        # change only the middle h_res (the last one cannot matter under a mean collapse: its columns sum to 1)
        hcs[1].coeffs.bias[8:] = torch.randn(16) * 3
    assert not torch.allclose(run(), base, atol=1e-4)


def test_expand_and_reduce():
    h = torch.randn(2, 3, C)
    x = expand_streams(h, 4)
    assert x.shape == (2, 3, 4, C) and x.is_contiguous()
    assert torch.equal(reduce_streams(x, "mean"), h)
    torch.testing.assert_close(reduce_streams(x, "sum"), 4 * h)
    head = mhckit.StreamHead(C, 4)
    torch.testing.assert_close(reduce_streams(x * torch.arange(1.0, 5.0)[:, None], "head", head=head), 2.5 * h)
    assert torch.equal(mhckit.StreamHead(C, 1)(expand_streams(h, 1)), h)


def test_stream_head_learns_weights():
    head = mhckit.StreamHead(C, 4)
    x = torch.randn(8, 4, C)
    with torch.no_grad():
        head.fn.normal_()
        head.scale.fill_(1.0)
    w = head.weights(x)
    assert w.shape == (8, 4) and not torch.allclose(w, torch.full_like(w, 0.25))


@pytest.mark.parametrize("variant", ["residual", *STREAM_VARIANTS])
def test_gpt_trains_every_variant(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=2, n_head=2, d_model=16, hc=MHCConfig(variant=variant))
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tok = torch.randint(0, 16, (4, 9))
    losses = []
    for _ in range(15):
        _, loss = model(tok[:, :-1], tok[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_gpt_residual_variant_is_plain_gpt():
    torch.manual_seed(0)
    tok = torch.randint(0, 16, (2, 8))
    cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=2, n_head=2, d_model=16, hc=MHCConfig(variant="residual"))
    model = GPT(cfg)
    h = model.embed(tok)
    for blk in model.blocks:
        h = h + blk.attn.branch(h)
        h = h + blk.mlp.branch(h)
    assert torch.equal(model(tok), model.head(model.norm(h)))
