"""Backend registry and capability probe (no kernels here).

Backends:
    ``torch``      fused PyTorch autograd Functions (``ops/autograd.py``); any device. The default.
    ``reference``  :mod:`mhckit.reference`, plain autograd through the spec; any device.

``backend="auto"`` picks the fastest available backend for the tensors' device; asking for a
backend that is not available raises with a message that says why (never a silent fallback).
"""

from __future__ import annotations

BACKENDS = ("torch", "reference")
UNAVAILABLE = {
    "triton": "mhckit 0.1 has no Triton kernels yet; use backend='torch' (the default) or 'reference'",
}


def available_backends() -> tuple[str, ...]:
    """The backends that can run here."""
    return BACKENDS


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to a concrete backend and validate explicit choices."""
    if backend == "auto":
        return "torch"
    if backend in BACKENDS:
        return backend
    if backend in UNAVAILABLE:
        raise ValueError(f"backend: got {backend!r}, which is not available: {UNAVAILABLE[backend]}")
    allowed = ", ".join(repr(b) for b in ("auto",) + BACKENDS)
    raise ValueError(f"backend: got {backend!r}; expected one of {allowed}")
