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


def triton_gpt(n_layer: int = 2, recompute: int = 0):
    """A tiny GPT with mHC on the Triton backend (seed 0, 5 Sinkhorn iterations) on DEVICE."""
    from mhckit import MHCConfig
    from mhckit.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layer=n_layer, n_head=2, d_model=16, recompute=recompute,
                    hc=MHCConfig(variant="mhc", backend="triton", sinkhorn_iters=5))
    return GPT(cfg).to(DEVICE)


def triton_gpt_tokens() -> torch.Tensor:
    """``[2, 9]`` tokens for :func:`triton_gpt` (inputs and targets)."""
    return torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
