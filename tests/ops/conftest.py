"""Device and interpreter setup for the Triton tests (tests/ops/test_triton_*.py).

With CUDA the Triton tests run on the GPU. Without it they run in Triton's CPU interpreter, which
needs ``TRITON_INTERPRET=1`` *before* the kernels are defined (when ``mhckit.ops.triton`` is first
imported). It is set here for that import and then again around each test of this folder only:
the rest of the suite runs without it (tests/test_functional.py checks that ``backend="triton"``
refuses CPU tensors when the interpreter is off).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _import_kernels() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for mod in ("sinkhorn", "coeffs", "pre", "post_res"):
            importlib.import_module(f"mhckit.ops.triton.{mod}")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


if HAVE_TRITON:
    _import_kernels()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (0 if both are 0), in float64."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()
