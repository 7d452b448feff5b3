"""torch.compile: a GPT with mHC (default torch backend) traces as one graph, forward and backward."""

from __future__ import annotations

import pytest
import torch

from mhckit import MHCConfig
from mhckit.models import GPT, GPTConfig


def _model(variant="mhc"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, hc=MHCConfig(variant=variant)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


TOK = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))


def test_no_graph_breaks():
    import torch._dynamo as dynamo

    dynamo.reset()
    explained = dynamo.explain(_model())(TOK[:, :-1], TOK[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", ["mhc"])
def test_fullgraph_compile_matches_eager(variant):
    torch._dynamo.reset()
    eager, compiled_model = _model(variant), _model(variant)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    _, loss_e = eager(TOK[:, :-1], TOK[:, 1:])
    _, loss_c = compiled(TOK[:, :-1], TOK[:, 1:])
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
