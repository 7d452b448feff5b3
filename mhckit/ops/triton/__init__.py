"""Triton kernels of mhckit's fused ops (the ``"triton"`` backend), one file per fused op.

Importing this package imports ``triton``; mhckit imports it lazily (only when the ``"triton"``
backend is used), so ``import mhckit`` never needs Triton.

Files (each one: kernels -> launchers; autograd and ``torch.library`` ops live in
:mod:`mhckit.ops.triton_autograd`):

    sinkhorn.py  per-token Sinkhorn-Knopp forward / recompute-backward (``@triton.jit`` helpers
                 shared with coeffs.py) and standalone ``[T, n, n]`` kernels
    coeffs.py    ``v @ phi`` + ``sum(v^2)`` pass, fused RMS / gates / sigmoid / Sinkhorn epilogue,
                 and the fused backward
    pre.py       ``u = sum_j h_pre[j] x[j]`` and its backward
    post_res.py  ``x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y`` and its backward

CPU testing: with ``TRITON_INTERPRET=1`` set before this package is first imported, the kernels
run in Triton's interpreter on CPU tensors (slow, for tests). Environment knobs:

    MHCKIT_TRITON_AUTOTUNE=0     one config per kernel on GPU (no autotuning; used by the GPU tests)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "interpreting",
    "configs",
    "num_sms",
    "next_pow2",
    "auto_splits",
    "split_chunk",
    "cast_out",
    "per_token_block",
    "token_rows_block",
]


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on now (``TRITON_INTERPRET=1``)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# Kernels are built as interpreted functions or as GPU kernels when they are *defined*, i.e. when
# the kernel modules below are first imported; remember which one this process got.
INTERPRETED = interpreting()
_AUTOTUNE = os.environ.get("MHCKIT_TRITON_AUTOTUNE", "1") != "0"
_MANUAL_RTNE = tl.constexpr(INTERPRETED)


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even.

    On GPUs ``.to()`` rounds to nearest even already; Triton's interpreter truncates fp32 ->
    bfloat16, so there the rounding is done by hand on the bits (finite values; inf stays inf).
    """
    if _MANUAL_RTNE and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


def configs(gpu: list[dict], interp: dict) -> list[triton.Config]:
    """Autotune configs: ``interp`` alone under the interpreter, the first GPU one without autotuning.

    Each dict holds the meta-parameters plus optional ``num_warps`` / ``num_stages``.
    """

    def make(d: dict) -> triton.Config:
        d = dict(d)
        warps, stages = d.pop("num_warps", 4), d.pop("num_stages", 2)
        return triton.Config(d, num_warps=warps, num_stages=stages)

    if INTERPRETED:
        return [make(interp)]
    if not _AUTOTUNE:
        return [make(gpu[0])]
    return [make(d) for d in gpu]


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (1 on CPU / under the interpreter)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def auto_splits(device: torch.device, blocks: int, max_splits: int, waves: int = 4) -> int:
    """How many programs to split a reduction axis over so that ``blocks * splits`` fills the GPU.

    ``blocks`` is the number of programs along the parallel axis; the reduction axis is split
    only when they are too few for ``waves`` programs per multiprocessor. Always 1 on CPU.
    """
    if device.type != "cuda":
        return 1
    target = waves * num_sms(device)
    if blocks >= target:
        return 1
    return max(1, min(max_splits, triton.cdiv(target, max(blocks, 1))))


def split_chunk(length: int, splits: int) -> tuple[int, int]:
    """Cut ``length`` into ``splits`` contiguous slices; returns ``(slice length, real splits)``.

    Slice lengths are multiples of 16 (kernels take them in units of 16, so the compiler knows
    every slice starts 16-aligned and vectorises the loads), and of 256 when long enough (every
    BN / BC then divides them).
    """
    if splits <= 1:
        return triton.cdiv(length, 16) * 16, 1
    align = 256 if length >= 256 * splits else 16
    chunk = triton.cdiv(triton.cdiv(length, splits), align) * align
    return chunk, triton.cdiv(length, chunk)


def per_token_block(elems: int, np_: int, cap: int = 128) -> int:
    """Tokens per program of the per-token [BT, NP, NP] kernels: about ``elems`` entries per tile."""
    return max(1, min(cap, elems // (np_ * np_)))


def token_rows_block(rows: int, np_: int) -> int:
    """Tokens per program of the [BT, NP, BC] stream kernels: ``BT * NP`` = ``rows`` stream rows."""
    return max(1, rows // np_)
