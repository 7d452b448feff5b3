"""Stream recomputation (mHC section 4.3): same gradients, fewer saved stream tensors."""

from __future__ import annotations

import pytest
import torch

import mhckit
from mhckit import MHCConfig
from mhckit.models import GPT, GPTConfig
from mhckit.recompute import StreamRecompute, default_interval


def _saved_bytes(model, tok) -> int:
    """Bytes of distinct storages autograd keeps for backward after one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tok[:, :-1], tok[:, 1:])
    return sum(seen.values())


def _model(variant: str, recompute: int, n_layer: int = 3) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=32, n_layer=n_layer, n_head=2, d_model=32, recompute=recompute,
                    hc=MHCConfig(variant=variant))
    model = GPT(cfg)
    with torch.no_grad():  # leave the function-preserving start so that the streams differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


TOK = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["mhc", "hc", "mhc-lite", "identity"])
@pytest.mark.parametrize("every", [1, 2, 4])
def test_gradients_are_bitwise_equal(variant, every):
    grads = []
    for r in (0, every):
        model = _model(variant, r)
        _, loss = model(TOK[:, :-1], TOK[:, 1:])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_stream_tensors_are_dropped():
    n_streams, layers = 4, 4
    base = _saved_bytes(_model("mhc", 0, layers), TOK)
    stream_bytes = TOK[:, :-1].numel() * n_streams * 32 * 4
    for every in (2, 4):
        kept = _saved_bytes(_model("mhc", every, layers), TOK)
        dropped = 2 * layers - (2 * layers) // every  # sublayer inputs that are not a group's input
        assert base - kept == dropped * stream_bytes


def test_no_effect_without_grad_and_for_residual():
    model = _model("mhc", 2)
    with torch.no_grad():
        a = model(TOK[:, :-1])
    model.cfg.recompute = 0
    with torch.no_grad():
        assert torch.equal(a, model(TOK[:, :-1]))
    assert _model("residual", 2).recompute_interval == 0


def test_default_interval_is_the_papers():
    assert default_interval(4, 60) == 6  # sqrt(4 * 60 / 6) = 6.3
    assert default_interval(4, 8) == 2
    assert default_interval(1, 1) == 1
    assert _model("mhc", -1, n_layer=4).recompute_interval == 2


def test_bad_values():
    with pytest.raises(ValueError, match=r"recompute: got -2"):
        GPTConfig(recompute=-2)
    with pytest.raises(ValueError, match=r"every: got 0"):
        StreamRecompute(0)


@pytest.mark.parametrize("variant", ["mhc", "hc", "mhc-lite", "identity"])
def test_activation_checkpointing_of_a_hyper_connection(variant):
    """torch.utils.checkpoint (non-reentrant, what transformers uses) unpacks saved tensors once per
    node; every autograd Function must read ctx.saved_tensors a single time. Gradients match."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    hc = mhckit.HyperConnection(16, torch.nn.Linear(16, 16), n_streams=4, variant=variant)
    x = torch.randn(3, 5, 4, 16, requires_grad=True)
    hc(x).square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in hc.parameters()]
    x.grad = None
    hc.zero_grad()
    checkpoint(hc, x, use_reentrant=False).square().sum().backward()
    got = [x.grad] + [p.grad for p in hc.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
