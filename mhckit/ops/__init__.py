"""Backend registry and capability probe (no kernels here).

Backends:
    ``torch``      fused PyTorch autograd Functions (``ops/autograd.py``); any device. The default.
    ``reference``  :mod:`mhckit.reference`, plain autograd through the spec; any device.
    ``triton``     fused Triton kernels (``ops/triton/``, wrapped as ``torch.library`` custom ops in
                   ``ops/triton_autograd.py``); CUDA tensors, float16 / bfloat16 / float32 streams,
                   1 <= n <= 8. On CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``
                   set before the kernels are first imported; slow, for tests). Needs ``triton``.

``backend="auto"`` picks the fastest available backend for the tensors' device (``torch`` on CPU,
``triton`` for CUDA tensors it supports when Triton imports; ``MHCKIT_AUTO_TRITON=0`` keeps
``auto`` on ``torch`` everywhere); asking for a backend that is not available raises with a
message that says why (never a silent fallback).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

from .._compile import constant_result

BACKENDS = ("torch", "reference")
OPTIONAL_BACKENDS = ("triton",)
UNAVAILABLE: dict[str, str] = {}
TRITON_MAX_STREAMS = 8
_TRITON_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")


# The probes below read the environment, not tensors: under torch.compile they are evaluated once
# at trace time and treated as constants (assume_constant_result), so they cause no graph break.
_PROBED: dict[str, str | None] = {}


@constant_result
def _triton_import_error() -> str | None:
    """None if ``import triton`` works here, else why not (probed once per process)."""
    if "triton" not in _PROBED:
        try:
            importlib.import_module("triton")
            _PROBED["triton"] = None
        except Exception as e:  # ImportError, or a broken install raising anything else
            _PROBED["triton"] = (
                f"Triton is not importable ({type(e).__name__}: {e}); install it with "
                "`pip install triton` (triton==3.7.1 matches torch 2.13; Linux with an NVIDIA GPU), "
                "or use backend='torch'"
            )
    return _PROBED["triton"]


@constant_result
def _auto_may_pick_triton() -> bool:
    return os.environ.get("MHCKIT_AUTO_TRITON", "1") != "0"


@constant_result
def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@constant_result
def _cpu_problem() -> str | None:
    """Why CPU tensors cannot run the Triton kernels now (None: the interpreter is on)."""
    if not _interpret_requested():
        return (
            "the tensors are on the CPU and the Triton kernels need CUDA tensors; use backend='torch' "
            "on CPU, or set TRITON_INTERPRET=1 (Triton's CPU interpreter, slow, for tests) before "
            "mhckit's Triton kernels are first imported"
        )
    kernels = sys.modules.get("mhckit.ops.triton")
    if kernels is not None and not kernels.INTERPRETED:
        return (
            "TRITON_INTERPRET=1 is set but mhckit.ops.triton was imported before it was, so its "
            "kernels were built for the GPU; set TRITON_INTERPRET=1 before the first use"
        )
    return None


def triton_problem(*tensors, n_streams: int | None = None) -> str | None:
    """Why the ``triton`` backend cannot run on ``tensors`` (None if it can).

    The first tensor is the streams ``[..., n, C]`` (or logits ``[..., n, n]``): ``n`` is read
    from its dim -2 unless ``n_streams`` is given.
    """
    err = _triton_import_error()
    if err is not None:
        return err
    if not tensors:
        return None
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        return f"the tensors are on different devices ({sorted(str(t.device) for t in tensors)})"
    if devices != {"cuda"}:
        if devices != {"cpu"}:
            return f"the Triton kernels need CUDA tensors; got device {devices.pop()!r}"
        why = _cpu_problem()
        if why is not None:
            return why
    for t in tensors:
        if str(t.dtype) not in _TRITON_DTYPES:
            return (
                f"the Triton kernels support float16, bfloat16 and float32 tensors (they compute in "
                f"float32); got {t.dtype}; use backend='torch' or 'reference' for {t.dtype}"
            )
    n = n_streams if n_streams is not None else (tensors[0].shape[-2] if tensors[0].dim() >= 2 else None)
    if n is not None and not 1 <= n <= TRITON_MAX_STREAMS:
        return f"the Triton kernels support 1 <= n_streams <= {TRITON_MAX_STREAMS}; got n_streams={n}"
    return None


def available_backends() -> tuple[str, ...]:
    """The backends that can run here (``triton`` when Triton imports; it still needs CUDA tensors)."""
    if _triton_import_error() is None:
        return BACKENDS + OPTIONAL_BACKENDS
    return BACKENDS


def resolve_backend(backend: str, *tensors, n_streams: int | None = None) -> str:
    """Map ``"auto"`` to a concrete backend and validate explicit choices.

    ``tensors`` (optional, the streams or logits first) let ``"auto"`` pick ``triton`` for CUDA
    tensors it supports and let ``"triton"`` check the device, dtypes and ``n`` up front.
    """
    if backend == "auto":
        if tensors and all(t.device.type == "cuda" for t in tensors) and _auto_may_pick_triton():
            if triton_problem(*tensors, n_streams=n_streams) is None:
                return "triton"
        return "torch"
    if backend in BACKENDS:
        return backend
    if backend in OPTIONAL_BACKENDS:
        why = triton_problem(*tensors, n_streams=n_streams)
        if why is not None:
            raise ValueError(f"backend: got {backend!r}, which is not available: {why}")
        return backend
    if backend in UNAVAILABLE:
        raise ValueError(f"backend: got {backend!r}, which is not available: {UNAVAILABLE[backend]}")
    allowed = ", ".join(repr(b) for b in ("auto",) + BACKENDS + OPTIONAL_BACKENDS)
    raise ValueError(f"backend: got {backend!r}; expected one of {allowed}")
