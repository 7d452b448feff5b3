"""torch.compile: a GPT with mHC (default torch backend) traces as one graph, forward and backward."""

from __future__ import annotations

import collections

import pytest
import torch

from mhckit import MHCConfig
from mhckit.models import GPT, GPTConfig
from tests.conftest import compiled_step_matches_eager


def _model(variant="mhc", recompute=0, iters=20):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, recompute=recompute,
                          hc=MHCConfig(variant=variant, sinkhorn_iters=iters)))
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


@pytest.mark.parametrize("variant", ["mhc", "hc", "mhc-lite", "identity"])
def test_fullgraph_compile_matches_eager(variant):
    """(HC's h_res reaches mhckit::post_res transposed; the fake backward once promised the input's
    strides for dh_res and the compiled backward failed.)"""
    compiled_step_matches_eager(_model(variant), _model(variant), TOK)


def test_compiled_cpu_model_runs_the_c_kernels_as_custom_ops(kernel_calls):
    """While tracing CPU tensors HyperConnection's fused read / write-back pair becomes two torch.library
    ops (mhckit/ops/carry.py; the Sinkhorn is then one opaque node, not hundreds), and at run time
    those call the compiled C kernels, forward and backward; switched off at run time
    (cpu.disabled) the ops run PyTorch ops instead, with the same results."""
    import re

    import torch._dynamo as dynamo
    from mhckit.ops import cpu

    if not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")
    dynamo.reset()
    explained = dynamo.explain(_model())(TOK[:, :-1], TOK[:, 1:])
    ops = set(re.findall(r"torch\.ops\.mhckit\.(\w+)", explained.graphs[0].code))
    assert ops == {"carry_read", "carry_write"}, ops

    dynamo.reset()
    eager, compiled_model = _model(), _model()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    _, loss_c = compiled(TOK[:, :-1], TOK[:, 1:])
    loss_c.backward()
    names = {name for name, _ in kernel_calls}
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_post_res_fwd", "mhc_post_res_bwd"} == names, names
    _, loss_e = eager(TOK[:, :-1], TOK[:, 1:])
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    grads = [p.grad.clone() for p in compiled_model.parameters()]
    for (name, a), b in zip(eager.named_parameters(), grads):
        torch.testing.assert_close(b, a.grad, rtol=1e-4, atol=1e-6, msg=name)

    kernel_calls.clear()
    compiled_model.zero_grad()
    with cpu.disabled():
        _, loss_m = compiled(TOK[:, :-1], TOK[:, 1:])
        loss_m.backward()
    assert not kernel_calls
    torch.testing.assert_close(loss_m, loss_c, rtol=1e-5, atol=1e-6)
    for (name, p), g in zip(compiled_model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_functional_ops_on_cpu_run_the_c_kernels(kernel_calls):
    """The public ops under torch.compile on CPU tensors: mhckit::coeffs / pre / post_res nodes that
    run the C kernels, gradients equal to eager."""
    import re

    import torch._dynamo as dynamo
    from mhckit import functional as F
    from mhckit.ops import cpu
    from tests.conftest import make_mhc_inputs

    if not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")

    def sublayer(x, phi, bias, alpha, w):
        u, h_pre, h_post, h_res = F.mhc_coeffs_pre(x, phi, bias, alpha)
        return F.mhc_post_res(x, torch.tanh(u @ w), h_post, h_res)

    args = make_mhc_inputs((2, 5), 4, 16, dtype=torch.float32, seed=3, requires_grad=True)
    w = (0.1 * torch.randn(16, 16)).requires_grad_()
    dynamo.reset()
    code = dynamo.explain(sublayer)(*args, w).graphs[0].code
    assert set(re.findall(r"torch\.ops\.mhckit\.(\w+)", code)) == {"coeffs", "pre", "post_res"}
    out = torch.compile(sublayer, fullgraph=True, backend="aot_eager")(*args, w)
    out.square().sum().backward()
    assert {"mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_pre_fwd", "mhc_pre_bwd", "mhc_post_res_fwd",
            "mhc_post_res_bwd"} <= {name for name, _ in kernel_calls}
    compiled_grads = [t.grad.clone() for t in (*args, w)]
    for t in (*args, w):
        t.grad = None
    sublayer(*args, w).square().sum().backward()
    for name, a, t in zip(("x", "phi", "bias", "alpha", "w"), compiled_grads, (*args, w)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_bfloat16_model_on_cpu_runs_the_half_kernels(kernel_calls):
    """A GPT cast to bf16 and compiled: the carry ops take the 2-byte streams to the half kernels; same
    loss and gradients as eager (which runs the same kernels through the autograd Functions)."""
    import torch._dynamo as dynamo
    from mhckit.ops import cpu

    if torch.bfloat16 not in {getattr(torch, s.removeprefix("torch.")) for s in cpu.status()["half_streams"]}:
        pytest.skip("no bf16 stream kernels in this build")
    dynamo.reset()
    eager, compiled_model = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    _, loss_c = compiled(TOK[:, :-1], TOK[:, 1:])
    loss_c.backward()
    assert {(k, torch.bfloat16) for k in ("mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_post_res_fwd",
                                          "mhc_post_res_bwd")} <= set(kernel_calls)
    _, loss_e = eager(TOK[:, :-1], TOK[:, 1:])
    loss_e.backward()
    assert loss_c.item() == loss_e.item()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        assert b.grad.dtype == torch.bfloat16
        torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=2e-2, atol=2e-2 * a.grad.abs().max().item(),
                                   msg=name)


def test_constant_result_marks_functions_as_torch_does():
    """mhckit marks its trace-time probes itself (mhckit/_compile.py) to keep torch._dynamo out of
    ``import mhckit``; the mark must be the one torch's decorator sets (test_no_graph_breaks then
    checks that dynamo honours it)."""
    from mhckit._compile import constant_result

    def ours():
        return 1

    def torchs():
        return 1

    constant_result(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) != {}


def test_import_does_not_load_dynamo():
    """``import mhckit`` stays fast: torch._dynamo (~1.5 s to import) loads only when compiling."""
    import subprocess
    import sys

    code = "import sys, mhckit, mhckit.functional, mhckit.models; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- recomputation under torch.compile (mhckit.recompute.sequential) ------------------------------


def test_recompute_traces_as_one_graph():
    """GPTConfig.recompute under torch.compile: checkpoint regions, not saved-tensor hooks (which
    dynamo cannot trace: a graph break per sublayer, and fullgraph=True failed)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    explained = dynamo.explain(_model(recompute=-1))(TOK[:, :-1], TOK[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


STREAM_BYTES = TOK.shape[0] * (TOK.shape[1] - 1) * 4 * 32 * 4  # one [B, T, n, C] float32 stream tensor


def _saved_bytes(compiled):
    from mhckit.train.memory import saved_activation_bytes

    return saved_activation_bytes(compiled, TOK[:, :-1], TOK[:, 1:])


@pytest.mark.parametrize("variant", ["mhc", "hc", "identity"])
def test_compiled_recompute_matches_eager_and_drops_the_streams(variant):
    """Compiled with recompute=-1 (L_r = 2 sublayers -> one block per region): loss and gradients of
    the eager model without recomputation, and the compiled step saves at least the streams written
    inside the regions (one per block here) fewer bytes than the compiled step without it. (hc: its
    read is mhckit::carry_hc_read; identity: carry_read without h_res.)"""
    eager, model = _model(variant), _model(variant, recompute=-1)
    assert model.compiled_recompute_blocks == 1
    compiled = compiled_step_matches_eager(model, eager, TOK)
    kept = _saved_bytes(torch.compile(eager, fullgraph=True, backend="aot_eager"))
    assert kept - _saved_bytes(compiled) >= 2 * STREAM_BYTES, (kept, _saved_bytes(compiled))


def test_compiled_recompute_reruns_the_kernels_in_backward(kernel_calls):
    """On the C kernels: the backward runs the reads' and the write-backs' forward kernels again
    (the reads once per sublayer: the paper's "re-executing the mHC kernels without F")."""
    import torch._dynamo as dynamo
    from mhckit.ops import cpu

    if not cpu.status()["active"]:
        pytest.skip("compiled CPU kernels unavailable")
    dynamo.reset()
    model = _model(recompute=-1)
    _, loss = torch.compile(model, fullgraph=True, backend="aot_eager")(TOK[:, :-1], TOK[:, 1:])
    forward = collections.Counter(name for name, _ in kernel_calls)
    kernel_calls.clear()
    loss.backward()
    backward = collections.Counter(name for name, _ in kernel_calls)
    assert forward["mhc_coeffs_fwd"] == forward["mhc_post_res_fwd"] == 4, forward
    assert backward["mhc_coeffs_fwd"] == 4 and backward["mhc_post_res_fwd"] >= 2, backward
    assert backward["mhc_coeffs_bwd"] == 4, backward


def test_compiled_recompute_without_the_c_kernels(monkeypatch):
    """Where the reads are traced PyTorch ops (no compiled CPU kernels while tracing), the write-backs
    inside the regions are still mhckit::post_res operators, so the streams are still dropped."""
    import torch._dynamo as dynamo
    from mhckit import functional

    monkeypatch.setattr(functional, "_compile_cpu", lambda *tensors: False)
    monkeypatch.setattr(functional, "_carry_mode", lambda *args: None)
    dynamo.reset()
    model = _model(recompute=-1, iters=2)  # the traced PyTorch Sinkhorn: a few iterations compile faster
    graph = dynamo.explain(model)(TOK[:, :-1], TOK[:, 1:]).graphs[0]
    code = "".join(m.code for m in graph.modules() if isinstance(m, torch.fx.GraphModule))  # and the regions'
    assert "tag_activation_checkpoint" in code
    assert "mhckit.post_res" in code and "mhckit.carry" not in code and "mhckit.coeffs" not in code
    dynamo.reset()
    kept = _saved_bytes(torch.compile(_model(iters=2), fullgraph=True, backend="aot_eager"))
    dropped = _saved_bytes(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert kept - dropped >= 2 * STREAM_BYTES, (kept, dropped)


def test_sequential_eager_is_stream_recompute():
    """recompute.sequential in eager mode: the gradients of the plain loop, bitwise, with the streams
    inside each group dropped (fewer saved bytes); bad arguments are refused by name."""
    from mhckit import HyperConnection, recompute
    from mhckit.train.memory import saved_activation_bytes

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(HyperConnection(16, torch.nn.Linear(16, 16), layer_index=i, n_streams=4)
                                 for i in range(6))
    x = torch.randn(3, 5, 4, 16)

    def run(every):
        for p in layers.parameters():
            p.grad = None
        recompute.sequential(layers, x, every).square().sum().backward()
        return [p.grad.clone() for p in layers.parameters()]

    plain = run(0)
    for a, b in zip(run(3), plain):
        assert torch.equal(a, b)

    class Wrapped(torch.nn.Module):
        def __init__(self, every):
            super().__init__()
            self.layers, self.every = layers, every

        def forward(self, x, y=None):
            out = recompute.sequential(self.layers, x, self.every)
            return out, out.square().mean()

    assert saved_activation_bytes(Wrapped(3), x, None) < saved_activation_bytes(Wrapped(0), x, None)
    with pytest.raises(ValueError, match=r"every: got -1"):
        recompute.sequential(layers, x, -1)
    with pytest.raises(ValueError, match=r"modules\[1\]: got int"):
        recompute.sequential([layers[0], 3], x, 1)


@pytest.mark.parametrize("variant", ["mhc", "hc", "mhc-lite", "identity"])
def test_exported_model_matches_eager(variant):
    """``torch.export`` (inference: a frozen graph for serving) of a GPT with each variant: the C
    kernels' pair as mhckit's custom ops where they are built, the eager logits to the bit."""
    from mhckit.ops import cpu

    model = _model(variant).eval()
    tok = TOK[:, :-1]
    exported = torch.export.export(model, (tok,))
    ops = {str(n.target) for n in exported.graph.nodes if "mhckit" in str(n.target)}
    if cpu.status()["active"]:
        read = "mhckit.carry_hc_read.default" if variant == "hc" else "mhckit.carry_read.default"
        assert ops == {read, "mhckit.carry_write.default"}, ops
    with torch.no_grad():
        got, want = exported.module()(tok), model(tok)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert torch.equal(got, want)
