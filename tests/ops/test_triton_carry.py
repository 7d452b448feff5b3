"""HyperConnection's read / write-back pair on the Triton kernels (mhckit/ops/carry.py, ``triton=True``):
the write-back's dx travels along the carrier and the coefficient dx kernel adds it and the read's
``h_pre[j] du`` to its own, so a sublayer's backward writes one stream gradient and autograd adds none.
On the GPU when there is one, else in Triton's interpreter (tests/ops/conftest.py)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhckit
from mhckit import reference
from mhckit.ops.carry import CoeffsCarryFunction, PostCarryFunction, separate_ops

from tests.ops.conftest import DEVICE, HAVE_TRITON, max_rel_err, triton_gpt, triton_gpt_tokens

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _pair(n, c, dtype=torch.float32, seed=0):
    """A Triton-backend sublayer and a reference twin with the same (perturbed) weights, a branch
    weight and streams [2, 3, n, c]."""
    torch.manual_seed(seed)
    fast = mhckit.HyperConnection(c, None, n_streams=n, variant="mhc", backend="triton").to(DEVICE)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = mhckit.HyperConnection(c, None, n_streams=n, variant="mhc", backend="reference").to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    w = (torch.randn(c, c) * 0.3).to(DEVICE)
    x = torch.randn(2, 3, n, c).to(DEVICE, dtype).requires_grad_()
    return fast, ref, w, x


def _step(hc, w, x):
    """``[loss, dx, dphi, dbias, dalpha]`` of one sublayer with branch tanh(u @ w), a weighted loss."""
    u, finish = hc.split(x)
    out = finish(torch.tanh(u.float() @ w).to(u.dtype))
    weights = torch.arange(out.numel(), device=out.device).reshape(out.shape).sin()
    loss = (out.float() * weights).sum()
    return [loss, *torch.autograd.grad(loss, [x, hc.coeffs.phi, hc.coeffs.bias, hc.coeffs.alpha])]


@pytest.mark.parametrize("n,c", [(4, 24), (2, 40), (3, 16), (8, 8)])
def test_sublayer_on_the_carry_pair_matches_the_reference(n, c):
    fast, ref, w, x = _pair(n, c)
    assert fast.coeffs.read_carry(x)[-1] is True  # the Triton pair is the path taken
    for name, a, b in zip(["loss", "x", "phi", "bias", "alpha"], _step(fast, w, x), _step(ref, w, x)):
        assert max_rel_err(a, b) < 2e-5, name


def test_bf16_streams_match_the_separate_ops():
    """bf16 streams: the pair's dx is rounded once (its three terms summed in fp32) where the separate
    ops round three bf16 gradients and autograd adds them: equal to a few bf16 units."""
    fast, _, w, x = _pair(4, 32, dtype=torch.bfloat16)
    assert fast.coeffs.read_carry(x)[-1] is True
    got = _step(fast, w, x)
    with separate_ops():  # the separate Triton ops (coeffs, pre, post_res)
        assert fast.coeffs.read_carry(x) is None
        want = _step(fast, w, x)
    for name, a, b in zip(["loss", "x", "phi", "bias", "alpha"], got, want):
        assert max_rel_err(a, b) < 2e-2, name


class _StreamSums(TorchDispatchMode):
    """Counts aten add / add_ calls on tensors shaped like the streams."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("add", "add_") and any(getattr(a, "shape", None) == self.shape for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_backward_writes_one_stream_gradient():
    """With the pair autograd adds no stream gradients (the write-back's dx and the read's term join
    the coefficient dx kernel); with the separate ops it adds three into two."""
    fast, _, w, x = _pair(4, 24)

    def sums():
        u, finish = fast.split(x)
        out = finish(torch.tanh(u @ w))
        with _StreamSums(x.shape) as mode:
            torch.autograd.grad(out.sum(), [x, *fast.parameters()])
        return mode.count

    assert sums() == 0
    with separate_ops():
        assert sums() >= 2


def test_several_write_backs_of_one_read():
    """Autograd sums what the write-backs send along the carrier (their dx): linear, so right."""
    torch.manual_seed(0)
    n, c, k = 4, 16, 24
    x = torch.randn(5, n, c, device=DEVICE, requires_grad=True)
    phi = (torch.randn(n * c, k) * 0.05).to(DEVICE).requires_grad_()
    bias = (torch.randn(k) * 0.3).to(DEVICE).requires_grad_()
    alpha = torch.tensor([0.8, 0.6, 0.7], device=DEVICE, requires_grad=True)
    y1, y2 = torch.randn(5, c, device=DEVICE), torch.randn(5, c, device=DEVICE)
    leaves = [x, phi, bias, alpha]

    u, h_pre, h_post, h_res, carrier = CoeffsCarryFunction.apply(x, phi, bias, alpha, 20, 1e-6, True)
    out = PostCarryFunction.apply(carrier, y1 * u, h_post, h_res, True) + 2 * PostCarryFunction.apply(
        carrier, y2, h_post, h_res, True)
    got = torch.autograd.grad((out * out).sum(), leaves)

    h_pre, h_post, h_res = reference.mhc_coeffs(x, phi, bias, alpha, iters=20, rms_eps=1e-6)
    u = reference.mhc_pre(x, h_pre)
    out = reference.mhc_post_res(x, y1 * u, h_post, h_res) + 2 * reference.mhc_post_res(x, y2, h_post, h_res)
    want = torch.autograd.grad((out * out).sum(), leaves)
    for name, a, b in zip(["x", "phi", "bias", "alpha"], got, want):
        assert max_rel_err(a, b) < 2e-5, name


def test_compiled_gpt_runs_the_pair_as_two_custom_ops():
    """Under torch.compile the Triton pair is mhckit::carry_read / carry_write (one graph, no breaks)
    and the compiled step equals the eager one."""
    import torch._dynamo as dynamo

    from tests.conftest import compiled_step_matches_eager

    tok = triton_gpt_tokens()
    dynamo.reset()
    explained = dynamo.explain(triton_gpt())(tok[:, :-1], tok[:, 1:])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = set(re.findall(r"torch\.ops\.mhckit\.(\w+)", explained.graphs[0].code))
    assert ops == {"carry_read", "carry_write"}, ops
    compiled_step_matches_eager(triton_gpt(), triton_gpt(), tok, atol=1e-5)


def test_stream_recomputation_on_the_pair():
    """GPTConfig.recompute in eager mode drops the pair's saved streams (the read's x, the write-back's
    carrier: a view of the same storage) and rebuilds them: gradients bitwise equal to the plain run,
    the saved bytes smaller by the dropped stream tensors."""
    tok = triton_gpt_tokens()
    grads, saved = [], []
    for every in (0, 2):
        m = triton_gpt(n_layer=4, recompute=every)
        seen = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = m(tok[:, :-1], tok[:, 1:])
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
        saved.append(sum(seen.values()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    stream_bytes = tok[:, :-1].numel() * 4 * 16 * 4
    assert saved[0] - saved[1] == (8 - 8 // 2) * stream_bytes  # 8 sublayers, every 2nd input kept


def test_without_autograd_the_pair_runs_its_kernels_without_the_functions(monkeypatch):
    """Under ``torch.no_grad`` the Triton pair's kernels run without its autograd Functions, and the new
    streams are bitwise those of a forward with autograd on."""
    fast, _, w, x = _pair(4, 24)
    x = x.detach()

    def sublayer():
        u, finish = fast.split(x)
        return finish(torch.tanh(u @ w))

    with_grad = sublayer().detach()
    for fn in (CoeffsCarryFunction, PostCarryFunction):
        monkeypatch.setattr(fn, "forward", staticmethod(lambda *a, **k: pytest.fail("a Function ran")))
    with torch.no_grad():
        bare = sublayer()
    assert torch.equal(bare, with_grad)
