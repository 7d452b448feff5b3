"""Heap settings for a CPU training process (glibc's malloc only).

PyTorch's CPU allocator takes every tensor from ``malloc`` and gives it back with ``free``. glibc
returns free memory at the top of its heap to the OS once more than ``M_TRIM_THRESHOLD`` is free, and
serves blocks above ``M_MMAP_THRESHOLD`` with fresh mappings. A training step frees most of its
activations at the end of backward and allocates them again in the next forward, so memory that is
given back is page-faulted in again every step. Measured on the default ``mhckit compare`` model
(2-core CPU): the mHC model took ~900-1200 minor page faults per step, the plain residual none; with
the settings below both take ~1. With the same two settings given through the environment (64 MiB /
256 MiB, also ~1 fault per step) mHC's tokens/s relative to the residual rose by +0.005 to +0.030
(+0.018 on average) over four pairs of runs. The cost: the process keeps its peak heap
(the next step needs it again). jemalloc / tcmalloc (``LD_PRELOAD``) keep freed memory by design;
glibc's ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` environment variables set the same
thing by hand, and when either is set this module leaves the heap alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB (glibc's own ceiling for its adaptive threshold) from the heap
TRIM_THRESHOLD = 1 << 30  # give memory back only when more than 1 GiB at the top of the heap is free
_USER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str:
    """Set the thresholds above (once per process); returns what was done, for the run's log."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "left alone (not glibc)"
    if any(k in os.environ for k in _USER_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left alone (set by the environment)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return f"left alone ({e})"
    return "freed memory kept (mmap threshold 32 MiB, trim threshold 1 GiB)" if ok else "left alone (mallopt refused)"
