"""Hugging Face retrofit (:mod:`mhckit.integrations.hf`) and ``mhckit retrofit`` on tiny random decoders.

Every model is built from a config here (no downloads): hidden 48, 2 layers, vocabulary 100.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mhckit import HyperConnection  # noqa: E402
from mhckit.integrations import retrofit_cli  # noqa: E402
from mhckit.integrations.hf import (  # noqa: E402
    CONFIG_KEY,
    hc_diagnostics,
    hyper_connections,
    is_retrofitted,
    load_retrofit,
    retrofit,
    save_retrofit,
    stream_spread,
)

VOCAB = 100
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


def tiny(arch: str, vocab: int = VOCAB, seed: int = 0):
    """A 2-layer random ``*ForCausalLM`` in eval mode."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=64, **ids)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **ids)
    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[arch]
    extra = {"head_dim": 12} if arch == "qwen3" else {}
    cfg = getattr(transformers, f"{cls}Config")(**common, **extra)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def tokens(b=2, t=12, seed=1, vocab=VOCAB):
    return torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def train_steps(model, ids, steps=6, lr=1e-2):
    """A few AdamW steps on one batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


# --------------------------------------------------------------------------- function-preserving start


@pytest.mark.parametrize("arch", ARCHS)
def test_step0_logits_equal_original(arch):
    """Default retrofit (mHC, n=4, mean-preserving) keeps the logits; the module structure is what we claim."""
    model = tiny(arch)
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        retro = retrofit(copy.deepcopy(model))
        out = retro(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-5
    assert not torch.equal(out, ref)  # the streams really go through the hyper-connections
    hcs = hyper_connections(retro)
    assert len(hcs) == 4 and all(hc.n_streams == 4 and hc.variant == "mhc" for hc in hcs)
    assert [hc.layer_index for hc in hcs] == [0, 1, 2, 3]
    assert is_retrofitted(retro) and not is_retrofitted(model)
    assert stream_spread(retro, ids) > 1e-2  # mean-preserving: the streams differ from step 0


@pytest.mark.parametrize("variant", ["hc", "mhc-lite", "identity", "residual"])
def test_other_variants_preserve_function(variant):
    model = tiny("llama")
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = retrofit(copy.deepcopy(model), 4, variant)(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-5
    if variant == "residual":  # exactly x + f(x): bit for bit, one stream, no new parameters
        assert torch.equal(out, ref)


def test_init_choices_documented_behaviour():
    """preserving: exact but copies; identity (public mHC start): sum h_pre != 1, close but not exact."""
    model = tiny("llama")
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        pres = retrofit(copy.deepcopy(model), init="preserving")
        ident = retrofit(copy.deepcopy(model), init="identity")
        assert rel_err(pres(input_ids=ids).logits, ref) < 1e-5
        assert stream_spread(pres, ids) < 1e-5
        assert rel_err(ident(input_ids=ids).logits, ref) > 1e-5


def test_bare_decoder_model_is_supported():
    """The backbone alone (``LlamaModel``): last_hidden_state is kept, and it is [B, T, C] again."""
    model = tiny("llama").model
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        out = retrofit(copy.deepcopy(model))(input_ids=ids).last_hidden_state
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


def test_learned_reduce_head_preserves_function():
    model = tiny("qwen2")
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = retrofit(copy.deepcopy(model), reduce="head")(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- training and generation


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss_and_streams_diverge(arch):
    model = retrofit(tiny(arch))
    ids = tokens(4, 16)
    hc = hyper_connections(model)[1]
    phi0, bias0 = hc.coeffs.phi.detach().clone(), hc.coeffs.bias.detach().clone()
    spread0 = stream_spread(model, ids)
    model, losses = train_steps(model, ids)
    assert losses[-1] < losses[0] - 0.5
    assert not torch.equal(hc.coeffs.phi, phi0) and not torch.equal(hc.coeffs.bias, bias0)
    assert stream_spread(model, ids) > max(1e-2, 0.5 * spread0)  # not copies of each other
    diag = hc_diagnostics(model, ids)
    assert diag["h_pre_uniform_dev"] > 1e-4  # the reads are no longer the plain mean
    assert abs(diag["forward_gain"] - 1) < 1e-3 and diag["hres_min"] >= 0  # still doubly stochastic


@pytest.mark.parametrize("variant", ["hc", "mhc-lite", "identity"])
def test_other_variants_train(variant):
    model = retrofit(tiny("gpt2"), variant=variant)
    _, losses = train_steps(model, tokens(4, 16))
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_matches_original_with_kv_cache(arch):
    model = tiny(arch)
    prompt = tokens(1, 5, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    retro = retrofit(copy.deepcopy(model))
    out = retro.generate(prompt, **kw)
    assert out.shape == (1, 13)
    assert torch.equal(out, ref)
    assert torch.equal(retro.generate(prompt, use_cache=False, **kw), out)


# --------------------------------------------------------------------------- save and load



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    """transformers' gradient checkpointing (non-reentrant) over retrofitted layers: same gradients."""
    grads = []
    for enable in (False, True):
        model = retrofit(tiny(arch), n_streams=4, variant="mhc")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("phi"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
        model.train()
        if enable:  # transformers 5.24 renamed it (the old name warns)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        ids = tokens()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("mhc" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])  # untied and tied embeddings
def test_save_load_round_trip(tmp_path, arch):
    model, _ = train_steps(retrofit(tiny(arch), n_streams=3, variant="mhc", sinkhorn_iters=10), tokens(4, 16))
    save_retrofit(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    entry = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert (entry["variant"], entry["n_streams"], entry["sinkhorn_iters"]) == ("mhc", 3, 10)
    loaded = load_retrofit(tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert [hc.n_streams for hc in hyper_connections(loaded)] == [3] * 4


def test_load_retrofit_rejects_plain_model(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"path: .*no 'mhckit' entry"):
        load_retrofit(tmp_path)
    with pytest.raises(ValueError, match=r"path: .*config.json"):
        load_retrofit(tmp_path / "missing")


# --------------------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"model: got Linear; expected a transformers decoder: Llama, Qwen2"):
        retrofit(torch.nn.Linear(2, 2))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"model: got BertModel \(model_type='bert'\); expected"):
        retrofit(bert)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"n_streams: got 0; expected an int in \[1, 64\]"):
        retrofit(model, n_streams=0)
    with pytest.raises(ValueError, match=r"variant: got 'mhcc'; expected one of"):
        retrofit(model, variant="mhcc")
    with pytest.raises(ValueError, match=r"init: got 'zeros'; expected one of"):
        retrofit(model, init="zeros")
    with pytest.raises(ValueError, match=r"reduce: got 'sum'; expected one of 'mean', 'head'"):
        retrofit(model, reduce="sum")
    with pytest.raises(ValueError, match=r"cfg: got unknown option\(s\) 'sinkhorn_iter'"):
        retrofit(model, sinkhorn_iter=3)
    assert not any(isinstance(m, HyperConnection) for m in model.modules())  # failed calls changed nothing
    retrofit(model)
    with pytest.raises(ValueError, match=r"model: got a LlamaForCausalLM that is already retrofitted"):
        retrofit(model)
    with pytest.raises(ValueError, match=r"model: got LlamaForCausalLM that is not retrofitted"):
        save_retrofit(tiny("llama"), "unused")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer Llama (vocabulary 256) with a byte-level BPE tokenizer, and a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root = tmp_path_factory.mktemp("retrofit-cli")
    model_dir = root / "tiny-llama"
    tiny("llama", vocab=256).save_pretrained(model_dir)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)
    import pydoc_data.topics

    corpus = root / "corpus.txt"
    corpus.write_text("".join(pydoc_data.topics.topics.values())[:20000])
    return model_dir, corpus


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    model_dir, corpus = tiny_model_dir
    out = tmp_path / "out"
    rc = retrofit_cli.main([str(model_dir), "--data", str(corpus), "--steps", "3", "--seq-len", "16",
                            "--batch-size", "2", "--eval-batches", "2", "--variants", "mhc,residual",
                            "--lr", "1e-2", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                            "--save-models"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert list(runs) == ["original", "mhc", "residual"]
    assert runs["mhc"]["step0_logit_rel_diff"] < 1e-5
    assert runs["mhc"]["val_loss_start"] == pytest.approx(runs["original"]["val_loss_start"], rel=1e-5)
    assert runs["residual"]["train_losses"] == runs["original"]["train_losses"]  # same batches, same function
    assert runs["mhc"]["train_losses"][-1] < runs["mhc"]["train_losses"][0]
    assert runs["mhc"]["hc_params"] > 0 and runs["original"]["hc_params"] == 0
    assert "forward_gain" in runs["mhc"]["diagnostics_end"]
    assert result["setup"]["tokenizer"].startswith("the model's own")
    table = (out / "results.md").read_text()
    assert "| mhc |" in table and "| original |" in table and table in capsys.readouterr().out
    reloaded = load_retrofit(out / "model-mhc")
    assert retrofit_cli.HFTokenizer is not None and is_retrofitted(reloaded)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: got 0; expected an int >= 1"),
    (["--lr", "-1"], "--lr: got -1.0; expected a number > 0.0"),
    (["--variants", "mhc,foo"], "--variants: got 'mhc,foo'; expected distinct names from"),
    (["--n-streams", "99"], "n_streams: got 99; expected an int in [1, 64]"),
    (["--mhc", "sinkhorn_iters=x"], "--mhc sinkhorn_iters: got 'x'; expected an int"),
    (["--mhc", "nope=1"], "--mhc: got unknown key 'nope'"),
    (["--warmup-steps", "50"], "--warmup-steps: got 50; expected at most --steps=20"),
    (["--data", "/no/such/corpus"], "--data: got '/no/such/corpus', which does not exist"),
])
def test_cli_rejects_bad_options_before_work(tiny_model_dir, tmp_path, capsys, argv, message):
    model_dir, _ = tiny_model_dir
    out = tmp_path / "never"
    assert retrofit_cli.main([str(model_dir), "--out-dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_bad_model_and_tokenizer(tiny_model_dir, tmp_path, capsys):
    model_dir, corpus = tiny_model_dir
    assert retrofit_cli.main([str(tmp_path / "nope")]) == 2
    assert "model: got" in capsys.readouterr().err
    plain = tmp_path / "plain"
    tiny("llama").save_pretrained(plain)  # vocabulary 100, no tokenizer: bytes do not fit
    rc = retrofit_cli.main([str(plain), "--data", str(corpus), "--out-dir", str(tmp_path / "o"),
                            "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    assert "byte-level ids need a vocabulary of at least 256; the model has 100" in capsys.readouterr().err
    assert retrofit_cli.main(["--help"]) == 0
    assert "--variants" in capsys.readouterr().out


# --------------------------------------------------------------------------- bf16 models on the CPU kernels


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_model_runs_on_the_half_kernels(arch, kernel_calls):
    """A model loaded in bf16 and retrofitted: its hyper-connections run the compiled CPU kernels on the
    bf16 streams (forward and backward; they used to fall back to the PyTorch ops), the retrofit still
    preserves the logits at step 0 to bf16 precision, and the loss and gradients agree with the
    PyTorch ops to bf16 rounding."""
    from mhckit.ops import cpu

    if "torch.bfloat16" not in cpu.status()["half_streams"]:
        pytest.skip("no bf16 stream kernels in this build")
    model = tiny(arch).to(torch.bfloat16)
    ids = tokens()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    retro = retrofit(copy.deepcopy(model))
    with torch.no_grad():
        assert rel_err(retro(input_ids=ids).logits.float(), ref) < 2e-2
    retro.train()
    torch.manual_seed(7)  # the same dropout masks in both passes (GPT-2 has dropout)
    loss = retro(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    ran = {name for name, dt in kernel_calls if dt == torch.bfloat16}
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_post_res_fwd", "mhc_post_res_bwd"} <= ran, ran
    grads = {k: p.grad.float().clone() for k, p in retro.named_parameters() if p.grad is not None}
    retro.zero_grad()
    with cpu.disabled():
        torch.manual_seed(7)
        loss_ops = retro(input_ids=ids, labels=ids, use_cache=False).loss
        loss_ops.backward()
    assert abs(loss.item() - loss_ops.item()) < 2e-2 * abs(loss_ops.item())
    for k, g in grads.items():
        g_ops = retro.get_parameter(k).grad.float()
        assert (g - g_ops).abs().max() <= 5e-2 * g_ops.abs().max() + 1e-6, k


@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_retrofitted_llama_compiles_fullgraph_like_eager(variant):
    """torch.compile(fullgraph=True) of a retrofitted Llama: one graph, the eager loss and gradients
    (hc: its transposed h_res once broke the compiled backward through a wrong fake)."""
    import torch._dynamo as dynamo

    model = retrofit(tiny("llama"), variant=variant).train()
    with torch.no_grad():  # off the function-preserving start, so that every gradient is non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    eager, ids = copy.deepcopy(model), tokens()
    dynamo.reset()
    explained = dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss_c.backward()
    loss_e = eager(input_ids=ids, labels=ids, use_cache=False).loss
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
