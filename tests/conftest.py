"""Shared test helpers: one per-dtype tolerance table and small factories."""

from __future__ import annotations

import pytest
import torch

# Triton's CPU interpreter must be on when `triton` is first imported (its standard-library functions
# are built then). transformers (tests/integrations) can import triton while test modules are being
# collected, before tests/ops/conftest.py would load; importing it here first keeps the interpreter
# tests valid in a full run.
import tests.ops.conftest  # noqa: E402,F401

# (rtol, atol) for comparing a fast path with the reference run in the same dtype.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=None, msg=""):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def compiled_step_matches_eager(model, eager, tokens, atol=1e-6):
    """One training forward + backward of ``torch.compile(model, fullgraph=True)`` (aot_eager) and of
    ``eager`` (same initial weights) on ``tokens [B, T + 1]``: the same loss and parameter gradients.
    Returns the compiled module."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, loss_c = compiled(tokens[:, :-1], tokens[:, 1:])
    loss_c.backward()
    _, loss_e = eager(tokens[:, :-1], tokens[:, 1:])
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=atol, msg=name)
    return compiled


def make_mhc_inputs(lead, n, c, dtype=torch.float64, seed=0, phi_scale=0.5, requires_grad=False):
    """Random streams and mHC parameters with non-zero phi, bias and alpha."""
    g = torch.Generator().manual_seed(seed)
    k = n * n + 2 * n
    x = torch.randn(*lead, n, c, generator=g, dtype=torch.float64).to(dtype)
    phi = torch.randn(n * c, k, generator=g, dtype=torch.float64) * phi_scale / (n * c) ** 0.5
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    alpha = torch.rand(3, generator=g, dtype=torch.float64) + 0.2
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = [x, phi.to(pdt), bias.to(pdt), alpha.to(pdt)]
    if requires_grad:
        out = [t.detach().requires_grad_() for t in out]
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """``[(kernel name, stream dtype), ...]``: every call of the compiled CPU kernels in the test (through
    their Python wrappers: the test runs the Python pair, not the C++ one, which calls them directly)."""
    from mhckit.ops import cpu
    from mhckit.ops.cpu import _pair

    calls = []
    real = cpu._call

    def spy(name, dtype, *args):
        calls.append((name, dtype))
        return real(name, dtype, *args)

    monkeypatch.setattr(cpu, "_call", spy)
    monkeypatch.setattr(_pair, "_ON", [False])
    return calls
