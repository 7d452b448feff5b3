"""Training memory of one model, measured the same way on every device.

On CUDA the allocator knows the peak (``torch.cuda.max_memory_allocated``), and ``mhckit
compare`` reads it around the training run. On CPU there is no allocator statistic, so
:func:`estimate_training_memory` counts what one training step must hold at its peak:

* parameters, gradients and the two AdamW moments: ``4 x`` the parameter bytes (tied weights
  counted once; fp32 master weights, as the trainer keeps them);
* activations: the exact bytes of the tensors autograd saves for backward during one forward on
  a training batch, captured with :func:`torch.autograd.graph.saved_tensors_hooks` and counted
  once per storage (views of one storage, and tensors saved twice, count once). Storages that
  belong to parameters are not activations and are left out.

This is an estimate of the training footprint, not a measurement of the process: it leaves out
allocator fragmentation, transient buffers inside kernels, the logits' gradient buffer and Python
overhead. Reports label it "estimated training memory (params+grads+Adam+saved activations)".
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

ADAM_STATES = 2  # exp_avg and exp_avg_sq


def _storage_key(t: Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, each storage once (tied weights counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for p in model.parameters():
        seen[_storage_key(p)] = p.untyped_storage().nbytes()
    return sum(seen.values())


def saved_activation_bytes(model: nn.Module, x: Tensor, y: Tensor, autocast=None) -> int:
    """Bytes of the tensors saved for backward by one training forward of ``model(x, y)``.

    ``model`` must return ``(logits, loss)``; the graph is dropped without a backward pass, so
    parameters and their ``.grad`` are untouched. ``autocast`` is an optional context manager
    (the trainer's autocast) to run the forward under.
    """
    params = {_storage_key(p) for p in model.parameters()}
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in params and key[1] != 0:
            storages[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(x, y)
        del out
    finally:
        model.train(was_training)
    return sum(storages.values())


def estimate_training_memory(model: nn.Module, x: Tensor, y: Tensor, autocast=None) -> dict[str, Any]:
    """``{param_bytes, grad_bytes, adam_bytes, activation_bytes, total_bytes, method}`` for one step."""
    pbytes = parameter_bytes(model)
    act = saved_activation_bytes(model, x, y, autocast)
    out = {
        "param_bytes": pbytes,
        "grad_bytes": pbytes,
        "adam_bytes": ADAM_STATES * pbytes,
        "activation_bytes": act,
    }
    out["total_bytes"] = sum(out.values())
    out["method"] = "estimate: params+grads+Adam+saved activations"
    return out


def format_bytes(n: float | None) -> str:
    """``12.3 MiB`` style (binary units); ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
