"""DeepSeek-V4 interop: mhckit's deepseek_v4 flavour against transformers' DeepseekV4 modules.

Every parity test randomises fn, base and scale (and uses non-default eps / iteration counts) so
that each term of the arithmetic moves the output.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M  # noqa: E402

import mhckit  # noqa: E402
from mhckit import diagnostics, reference  # noqa: E402
from mhckit.integrations import deepseek_v4 as D  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# (n, C, hc_sinkhorn_iters, hc_eps, rms_norm_eps): the eps are large enough that dropping one fails.
CASES = [(1, 8, 20, 1e-6, 1e-6), (2, 12, 3, 1e-3, 1e-2), (3, 8, 7, 1e-4, 1e-6), (4, 20, 20, 1e-6, 1e-3)]


def _config(n, c, iters=20, hc_eps=1e-6, rms_eps=1e-6, **kw):
    return DeepseekV4Config(
        hidden_size=c, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=hc_eps, rms_norm_eps=rms_eps, use_cache=False, **kw
    )


@torch.no_grad()
def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random fn / base / scale (any hc parameter found), with logits of order 1-3."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("fn", "hc_fn"):
            p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
        elif leaf in ("base", "hc_base"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif leaf in ("scale", "hc_scale"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return module


def _streams(n, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, n, c, generator=g) * torch.linspace(0.5, 2.0, n).unsqueeze(-1)


def _grads_fn(hc: D.DeepSeekV4HyperConnection):
    c = hc.coeffs
    return D.phi_to_fn(c.phi.grad, c.bias.grad, c.alpha.grad)


@pytest.mark.parametrize("n,c,iters,hc_eps,rms_eps", CASES)
def test_hyper_connection_matches_transformers(n, c, iters, hc_eps, rms_eps):
    ref = _randomise(M.DeepseekV4HyperConnection(_config(n, c, iters, hc_eps, rms_eps)), seed=n)
    branch = nn.Sequential(nn.Linear(c, c), nn.Tanh())
    ours = D.from_transformers(ref, branch=branch)
    assert isinstance(ours, mhckit.HyperConnection) and ours.variant == "deepseek_v4"
    x0, g = _streams(n, c), torch.randn(2, 3, n, c)
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()

    post, comb, collapsed = ref(x1)  # transformers' DeepseekV4DecoderLayer mixing, fp32:
    out_ref = post.unsqueeze(-1) * branch(collapsed).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x1)
    out = ours(x2)
    torch.testing.assert_close(out, out_ref, **TOL)

    p2, comb2, collapsed2 = ours.transformers_forward(x0)
    torch.testing.assert_close((p2, comb2, collapsed2), (post, comb, collapsed), **TOL)
    torch.testing.assert_close(ours.coefficients(x0)[2], comb.transpose(-1, -2), **TOL)  # h_res = comb^T
    if n > 1:
        assert (comb - comb.transpose(-1, -2)).abs().max() > 1e-2  # so the transpose is tested

    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    for got, want, name in zip(_grads_fn(ours), (ref.fn.grad, ref.base.grad, ref.scale.grad), D.HC_KEYS):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"grad of {name}\n{m}")


@pytest.mark.parametrize("n,c,iters,hc_eps,rms_eps", CASES)
def test_head_matches_transformers(n, c, iters, hc_eps, rms_eps):
    ref = _randomise(M.DeepseekV4HyperHead(_config(n, c, iters, hc_eps, rms_eps)), seed=10 + n)
    ours = D.from_transformers(ref)
    assert isinstance(ours, mhckit.StreamHead)
    x0, g = _streams(n, c), torch.randn(2, 3, c)
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out_ref, out = ref(x1), ours(x2)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(mhckit.reduce_streams(x0, "head", head=ours), out_ref, **TOL)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    pairs = ((ours.fn, ref.hc_fn), (ours.base, ref.hc_base), (ours.scale, ref.hc_scale))
    for mine, theirs in pairs:
        assert theirs.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad.reshape(theirs.shape), theirs.grad, **TOL)


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, h, **kwargs):
        return torch.tanh(self.proj(h)), None


class _MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, h, input_ids=None):
        return nn.functional.silu(self.proj(h))


def _tiny_model(n, c, layers=2, seed=0, iters=20, hc_eps=1e-6):
    """A DeepseekV4Model whose attention / MoE are small stand-ins (the hc path is what is tested)."""
    torch.manual_seed(seed)
    config = _config(
        n, c, iters, hc_eps, 1e-5, num_hidden_layers=layers, vocab_size=16, intermediate_size=16,
        moe_intermediate_size=8,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = M.DeepseekV4Model(config)
    for layer in model.layers:
        layer.self_attn, layer.mlp = _Attn(c), _MLP(c)
        with torch.no_grad():
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return _randomise(model, seed)


def _mhckit_model_forward(mods, model, embeds):
    for i, layer in enumerate(model.layers):
        mods[f"layers.{i}.attn_hc"].branch = lambda u, layer=layer: layer.self_attn(layer.input_layernorm(u))[0]
        mods[f"layers.{i}.ffn_hc"].branch = lambda u, layer=layer: layer.mlp(layer.post_attention_layernorm(u))
    x = mhckit.expand_streams(embeds, model.config.hc_mult)
    for name, m in mods.items():
        if name != "hc_head":
            x = m(x)
    return model.norm(mhckit.reduce_streams(x, "head", head=mods["hc_head"]))


def test_model_state_dict_matches_transformers_decoder():
    """All hyper-connections of a checkpoint (real key names), run through transformers' decoder layers."""
    n, c = 3, 16
    model = _tiny_model(n, c, layers=3, iters=5, hc_eps=1e-4)
    sd = {"model." + k: v for k, v in model.state_dict().items()}  # DeepseekV4ForCausalLM's keys
    mods = D.load_deepseek_v4_model(sd, config=model.config)
    assert list(mods) == [f"layers.{i}.{s}_hc" for i in range(3) for s in ("attn", "ffn")] + ["hc_head"]
    assert mods["layers.2.ffn_hc"].layer_index == 5 and mods["layers.0.attn_hc"].cfg.sinkhorn_iters == 5
    assert list(D.from_transformers(model)) == list(mods)

    e0 = torch.randn(2, 5, c)
    e1, e2 = e0.clone().requires_grad_(), e0.clone().requires_grad_()
    out_ref = model(inputs_embeds=e1).last_hidden_state
    out = _mhckit_model_forward(mods, model, e2)
    torch.testing.assert_close(out, out_ref, **TOL)
    g = torch.randn_like(out)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(e2.grad, e1.grad, **TOL)
    for i, layer in enumerate(model.layers):
        for site in ("attn", "ffn"):
            theirs = getattr(layer, f"{site}_hc")
            got = _grads_fn(mods[f"layers.{i}.{site}_hc"])
            torch.testing.assert_close(got, (theirs.fn.grad, theirs.base.grad, theirs.scale.grad), **TOL)
    torch.testing.assert_close(mods["hc_head"].fn.grad, model.hc_head.hc_fn.grad, **TOL)


def _deepseek_names(sd):
    """transformers' keys -> the original DeepSeek release's (transformers' conversion_mapping, reversed)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2", k)
        k = re.sub(r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", k)
        out[k] = v
    return out


def _assert_bit_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_norm_eps_is_read_under_either_name():
    """transformers 5.25 renamed the unweighted RMSNorm's ``eps`` to ``variance_epsilon``; both are read,
    and a norm with neither is refused by name (the installed version is covered by the tests above)."""

    class Old(nn.Module):
        eps = 1e-5

    class New(nn.Module):
        variance_epsilon = 3e-6

    assert D._norm_eps(Old()) == 1e-5 and D._norm_eps(New()) == 3e-6
    with pytest.raises(ValueError, match="input_norm.*neither"):
        D._norm_eps(nn.Identity())


def test_round_trips_are_bit_exact():
    model = _tiny_model(4, 8, layers=2)
    leaves = D.HC_KEYS + D.HEAD_KEYS
    hc_sd = {k: v for k, v in model.state_dict().items() if "hc" in k and k.rsplit(".", 1)[-1] in leaves}
    assert len(hc_sd) == 2 * 2 * 3 + 3
    # whole checkpoint, both key spellings, with and without a prefix
    mods = D.load_deepseek_v4_model(hc_sd)
    _assert_bit_equal(D.export_deepseek_v4(mods), hc_sd)
    original = _deepseek_names(hc_sd)
    assert "layers.1.hc_ffn_scale" in original and "hc_head_fn" in original
    _assert_bit_equal(D.export_deepseek_v4(D.load_deepseek_v4_model(original), naming="deepseek"), original)
    prefixed = {"model." + k: v for k, v in hc_sd.items()}
    _assert_bit_equal(D.export_deepseek_v4(D.load_deepseek_v4_model(prefixed), "model."), prefixed)
    # back into a fresh transformers model
    fresh = _tiny_model(4, 8, layers=2, seed=1)
    fresh.load_state_dict(D.export_deepseek_v4(mods), strict=False)
    _assert_bit_equal({k: v for k, v in fresh.state_dict().items() if k in hc_sd}, hc_sd)
    # single modules: state dict with a prefix, transformers module, bf16 kept as bf16
    layer_sd = {k[len("layers.1.ffn_hc.") :]: v for k, v in hc_sd.items() if k.startswith("layers.1.ffn_hc.")}
    sd = {"blk." + k: v for k, v in layer_sd.items()}
    _assert_bit_equal(D.export_deepseek_v4(D.load_deepseek_v4(sd, "blk."), "blk."), sd)
    bf16 = {k: v.to(torch.bfloat16) for k, v in layer_sd.items()}
    _assert_bit_equal(D.export_deepseek_v4(D.load_deepseek_v4(bf16)), bf16)
    wrapped = nn.Module()
    wrapped.model = model  # qualified names as in DeepseekV4ForCausalLM: model.layers.0.attn_hc, ...
    _assert_bit_equal(D.export_deepseek_v4(D.from_transformers(wrapped)), prefixed)
    for theirs in (model.layers[0].attn_hc, model.hc_head):
        back = D.to_transformers(D.from_transformers(theirs))
        assert type(back) is type(theirs)
        _assert_bit_equal(back.state_dict(), theirs.state_dict())


def test_layout_maps_comb_to_transposed_h_res():
    n, c = 3, 2
    fn = torch.zeros((2 + n) * n, n * c)
    fn[2 * n + 0 * n + 2, 1] = 7.0  # comb logit (j=0 -> k=2): old stream 0 into new stream 2
    fn[0, 0], fn[n + 1, 0] = 3.0, 5.0  # pre[0], post[1] stay in place
    phi, bias, alpha = D.fn_to_phi(fn, torch.arange(15.0), torch.tensor([1.0, 2.0, 3.0]))
    assert phi.shape == (n * c, (2 + n) * n)
    assert phi[1, 2 * n + 2 * n + 0] == 7.0 and phi[1].abs().sum() == 7.0  # h_res[k=2, j=0]
    assert phi[0, 0] == 3.0 and phi[0, n + 1] == 5.0
    assert bias[2 * n + 2 * n + 0] == 2 * n + 0 * n + 2 and torch.equal(alpha, torch.tensor([1.0, 2.0, 3.0]))
    g = torch.Generator().manual_seed(0)
    fn, base, scale = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(3, generator=g)
    for a, b in zip(D.phi_to_fn(*D.fn_to_phi(fn, base, scale)), (fn, base, scale)):
        assert torch.equal(a, b)


def test_sinkhorn_without_eps_is_mhckit_sinkhorn():
    logits = torch.randn(5, 4, 4) * 3
    ours = D.deepseek_v4_sinkhorn(logits, 6, eps=0.0)
    torch.testing.assert_close(ours, reference.sinkhorn(logits, 6), rtol=0, atol=1e-7)
    assert (D.deepseek_v4_sinkhorn(logits, 6, eps=1e-2) - reference.sinkhorn(logits, 6)).abs().max() > 1e-4


def _mhc_module(n=4, c=12):
    hc = mhckit.HyperConnection(c, nn.Linear(c, c), variant="mhc", n_streams=n, sinkhorn_iters=7, rms_eps=1e-5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (hc.coeffs.phi, hc.coeffs.bias):
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[0] ** 0.5 if p.dim() == 2 else 1.0))
        hc.coeffs.alpha.copy_(torch.rand(3, generator=g) + 0.5)
    return hc


def test_mhc_conversion_is_exact_up_to_eps():
    hc = _mhc_module()
    x = _streams(4, 12)
    exact = D.from_mhc(hc, hc_eps=0.0)
    assert exact.branch is hc.branch and exact.cfg.sinkhorn_iters == 7 and exact.cfg.rms_eps == 1e-5
    for name in ("phi", "bias", "alpha"):
        assert torch.equal(getattr(exact.coeffs, name), getattr(hc.coeffs, name))
    torch.testing.assert_close(exact(x), hc(x), rtol=1e-6, atol=1e-6)
    # the eps terms are the only difference; the Sinkhorn amplifies them where h_res has small entries
    diffs = [(D.from_mhc(hc, hc_eps=eps)(x) - hc(x)).abs().max().item() for eps in (1e-6, 1e-3)]
    assert 1e-7 < diffs[0] < 1e-3 and diffs[1] > 100 * diffs[0], diffs
    with_eps = D.from_mhc(hc, hc_eps=1e-3)
    _assert_bit_equal(D.export_deepseek_v4(hc), D.export_deepseek_v4(exact))
    _assert_bit_equal(D.to_mhc(with_eps).state_dict(), hc.state_dict())
    # the head: StreamHead <-> DeepseekV4HyperHead layout (scale [] <-> hc_scale [1])
    head = mhckit.StreamHead(12, 4)
    with torch.no_grad():
        head.fn.normal_(0, 0.3), head.base.normal_(), head.scale.fill_(0.7)
    ds_head = D.from_mhc(head, hc_eps=0.0)
    torch.testing.assert_close(ds_head(x), head(x), rtol=1e-6, atol=1e-6)
    assert D.export_deepseek_v4(head)["hc_scale"].shape == (1,)
    _assert_bit_equal(D.to_mhc(ds_head).state_dict(), head.state_dict())


def _hc_sd(n=3, c=8, prefix=""):
    ref = _randomise(M.DeepseekV4HyperConnection(_config(n, c)))
    return {prefix + k: v.detach() for k, v in ref.state_dict().items()}


def _bad(sd, key, shape):
    return {**sd, key: torch.zeros(shape)}


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (lambda: _bad(_hc_sd(prefix="m.l."), "m.l.fn", (15, 25)), {"prefix": "m.l."}, "m.l.fn.shape: got (15, 25)"),
        (lambda: _bad(_hc_sd(), "fn", (15, 24)), {"dim": 6}, "fn.shape: got (15, 24); expected (15, 18)"),
        (lambda: _hc_sd(), {"n_streams": 4}, "fn.shape: got (15, 24); expected (24, 24)"),
        (lambda: _bad(_hc_sd(), "base", (10,)), {}, "base.shape[0]: got 10 rows; expected (2+n)*n"),
        (lambda: _bad(_hc_sd(), "base", (8,)), {"n_streams": 3}, "base.shape: got (8,); expected (15,)"),
        (lambda: _bad(_hc_sd(), "scale", (2,)), {}, "scale.shape: got (2,); expected (3,)"),
        (lambda: {k: v for k, v in _hc_sd().items() if k != "base"}, {}, "state_dict: got no key 'base'"),
        (lambda: {"hc_fn": torch.zeros(3, 24), "hc_base": torch.zeros(3), "hc_scale": torch.zeros(2)}, {},
         "hc_scale.shape: got (2,); expected (1,)"),
        (lambda: {"hc_fn": torch.zeros(3, 25), "hc_base": torch.zeros(3), "hc_scale": torch.zeros(1)}, {},
         "hc_fn.shape: got (3, 25); expected (3, n*C) with n=3"),
        (lambda: {**_hc_sd(), "fn": torch.zeros(15, 24, dtype=torch.long)}, {},
         "fn: got torch.int64; expected a floating"),
    ],
)  # fmt: skip
def test_wrong_shapes_raise_naming_key_and_shapes(make, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        D.load_deepseek_v4(make(), **kwargs)


def test_incompatible_conversions_raise():
    sd = {k: v for k, v in _tiny_model(2, 8, layers=2).state_dict().items() if "hc" in k}
    sd["layers.1.attn_hc.fn"] = torch.zeros(8, 2 * 12)  # another width in layer 1
    with pytest.raises(ValueError, match=re.escape("layers.1.attn_hc.fn.shape: got (8, 24); expected (8, 16)")):
        D.load_deepseek_v4_model(sd)
    with pytest.raises(ValueError, match="state_dict: got no key like"):
        D.load_deepseek_v4_model({"embed.weight": torch.zeros(1)})
    ours = D.DeepSeekV4HyperConnection(8, n_streams=4)
    with pytest.raises(ValueError, match=re.escape("config.hc_mult: got 3; expected 4")):
        D.to_transformers(ours, _config(3, 8))
    with pytest.raises(ValueError, match=re.escape("config.hc_eps: got 0.001; expected 1e-06")):
        D.to_transformers(ours, _config(4, 8, hc_eps=1e-3))
    with pytest.raises(ValueError, match=re.escape("module.variant: got 'hc' with n_streams=4; expected 'mhc'")):
        D.from_mhc(mhckit.HyperConnection(8, variant="hc"))
    with pytest.raises(ValueError, match=re.escape("module.variant: got 'mhc' with n_streams=1")):
        D.export_deepseek_v4(mhckit.HyperConnection(8, n_streams=1))
    with pytest.raises(ValueError, match=re.escape("module.n_streams: got 1; expected >= 2")):
        D.to_mhc(D.DeepSeekV4HyperConnection(8, n_streams=1))
    with pytest.raises(ValueError, match=re.escape("module: got Linear; expected mhckit's HyperConnection")):
        D.export_deepseek_v4(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=re.escape("x.shape: got (2, 3, 8); expected [..., n_streams=4, dim=8]")):
        ours.split(torch.zeros(2, 3, 8))


def test_diagnostics_on_loaded_modules():
    """h_res = comb^T has exact row sums (forward gain 1); a 2-iteration Sinkhorn leaves the columns off."""
    model = _tiny_model(4, 8, layers=2, iters=2)
    with torch.no_grad():
        for layer in model.layers:
            for hc in (layer.attn_hc, layer.ffn_hc):
                hc.base[8:].mul_(4.0)  # sharp comb logits: far from converged after 2 iterations
    mods = D.from_transformers(model)
    stack = nn.ModuleList(m for name, m in mods.items() if name != "hc_head")
    for m in stack:
        m.branch = nn.Linear(8, 8)
    with diagnostics.record_coefficients(stack) as records:
        x = mhckit.expand_streams(torch.randn(2, 5, 8), 4)
        for m in stack:
            x = m(x)
    assert len(records) == 4 and all(r.h_res.shape == (2, 5, 4, 4) for r in records)
    for r in records:
        stats = diagnostics.hres_stats(r.h_res)
        assert stats["min"] > 0 and stats["max_row_sum_err"] < 1e-5 and stats["max_col_sum_err"] > 1e-3, stats
    report = diagnostics.gain_report([r.h_res for r in records], token_reduce="max")
    assert (report["forward_gain"] - 1).abs().max() < 1e-4
    assert (report["backward_gain"] - 1).abs().max() > 1e-3


def test_pure_mhckit_part_works_without_transformers(monkeypatch):
    path = Path(D.__file__)
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("transformers" in ast.unparse(n) for n in top_level)
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any `import transformers...` now fails
    spec = importlib.util.spec_from_file_location("mhckit.integrations._dsv4_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    hc = probe.DeepSeekV4HyperConnection(8, nn.Linear(8, 8), n_streams=2)
    assert hc(torch.randn(3, 2, 8)).shape == (3, 2, 8)
    sd = probe.export_deepseek_v4(hc)
    _assert_bit_equal(probe.export_deepseek_v4(probe.load_deepseek_v4(sd)), sd)
    with pytest.raises(ImportError):
        probe.from_transformers(hc)
