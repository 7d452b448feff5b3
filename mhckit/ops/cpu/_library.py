"""Building and loading the compiled CPU kernels (``mhc_cpu.c`` and its ``mhc_cpu*.h`` parts): the
compiler and instruction set, the cache directory keyed by a hash of the sources and flags, the ctypes
declarations, and :func:`status`. :mod:`mhckit.ops.cpu` re-exports what it uses; its docstring says how
the build is chosen."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("mhc_cpu.c")
_SOURCES = (_SOURCE, *sorted(_SOURCE.parent.glob("mhc_cpu*.h")))  # the cache key hashes them all
_ABI = 11
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": CDLL | None, "why": str | None, "path": str


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mhckit" / "kernels"


def _cache_root() -> Path:
    base = os.environ.get("MHCKIT_CACHE")
    return Path(base) / "kernels" if base else _default_cache_root()


def _cached(name: str, key: str) -> Path:
    """Where the build ``key`` of library ``name`` lives: under ``$MHCKIT_CACHE`` (else the default
    cache); a build already in the default cache serves another ``$MHCKIT_CACHE`` too (a data cache of
    its own, as the tests and the training subprocesses use, need not compile the kernels again:
    ~40 s for the C kernels, ~30 s for the C++ pair on a 2-core CPU)."""
    path, default = _cache_root() / key / name, _default_cache_root() / key / name
    return default if not path.exists() and default.exists() else path


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu99", "-fno-fast-math", "-Wno-psabi"]


ISAS = ("avx512", "avx2", "generic")


def _isa() -> str:
    """The instruction set the kernels are built for: ``$MHCKIT_CPU_ISA`` if set (one of :data:`ISAS`;
    it can only narrow what the CPU has), else what PyTorch itself dispatches to here."""
    try:
        cap = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "generic")
    except Exception:  # older torch
        cap = "generic"
    want = os.environ.get("MHCKIT_CPU_ISA", "").strip().lower()
    if not want:
        return cap
    if want not in ISAS:
        raise ValueError(f"MHCKIT_CPU_ISA: got {want!r}; expected one of {', '.join(ISAS)} (or unset)")
    return ISAS[max(ISAS.index(want), ISAS.index(cap))]  # never more than the CPU has


def _isa_flags() -> list[str]:
    """AVX2 + FMA (+ F16C, float16 conversions) where PyTorch itself dispatches to AVX2 or AVX-512,
    plus AVX-512 F / VL for the float32 matmul blocks where it dispatches to AVX-512 (part of the
    cache key)."""
    isa = _isa()
    return {"avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl"],
            "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}[isa]


def _compile_to(out: Path, commands: list[list[str]], tail: list[str], timeout: int) -> str | None:
    """Compile to ``out`` (atomically) with the first of ``commands`` that succeeds (each run as
    ``command -o <temp file> tail``); None on success, else every compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for command in commands:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [*command, "-o", tmp, *tail]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            res = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if res is not None and res.returncode == 0:
            os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
            return None
        if res is not None:
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-800:]}")
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


def _build(cc: str, out: Path) -> str | None:
    """Compile the C kernels to ``out``, with OpenMP when the compiler has it."""
    base = [cc, *_FLAGS, *_isa_flags()]
    return _compile_to(out, [[*base, "-fopenmp", str(_SOURCE)], [*base, str(_SOURCE)]], ["-lm"], timeout=120)


def _load() -> ctypes.CDLL | None:
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib, why = None, None
        if os.environ.get("MHCKIT_CPU_KERNELS", "1") == "0":
            why = "disabled by MHCKIT_CPU_KERNELS=0"
        elif (cc := _compiler()) is None:
            why = "no C compiler found (set CC, or install gcc / clang)"
        else:
            _STATE["isa"] = _isa()
            key = hashlib.sha256(
                b"".join(f.read_bytes() for f in _SOURCES) + " ".join([cc, *_FLAGS, *_isa_flags(), sys.platform]).encode()
            ).hexdigest()[:16]
            path = _cached("libmhc_cpu.so", key)
            _STATE["path"] = str(path)
            if not path.exists():
                try:
                    why = _build(cc, path)
                except OSError as e:  # e.g. a read-only cache directory
                    why = f"cannot build in {path.parent}: {e} (set MHCKIT_CACHE to a writable directory)"
            if why is None:
                try:
                    lib = ctypes.CDLL(str(path))
                    if lib.mhc_abi_version() != _ABI:
                        why, lib = f"{path}: ABI {lib.mhc_abi_version()}, expected {_ABI}", None
                except OSError as e:
                    why = f"{path}: {e}"
        if lib is not None:
            _declare(lib)
        elif not why.startswith("disabled"):
            warnings.warn(f"mhckit: compiled CPU kernels unavailable ({why}); using PyTorch ops", stacklevel=3)
        _STATE["lib"], _STATE["why"] = lib, why
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    formats = lib.mhc_half_formats()
    halves = [suf for bit, suf in ((1, "bf16"), (2, "f16")) if formats & bit]
    _STATE["halves"] = {dt for dt, suf in ((torch.bfloat16, "bf16"), (torch.float16, "f16")) if suf in halves}
    _STATE["zmm"] = bool(lib.mhc_avx512_matmuls())
    for suf in ("f32", "f64"):
        getattr(lib, f"mhc_sinkhorn_fwd_{suf}").argtypes = [p, i64, p, i64, i32, i32, i32]
        getattr(lib, f"mhc_sinkhorn_bwd_{suf}").argtypes = [p, i64, p, p, i64, i64, i32, i32, i32]
        getattr(lib, f"mhc_tail_fwd_{suf}").argtypes = [p, p, p, p, p, p, i64, i32, i32, i32]
        getattr(lib, f"mhc_tail_bwd_{suf}").argtypes = [p, p, p, p, p, p, p, i64, i32, i32, i32]
    for suf in ("f32", "f64", *halves):  # the stream kernels (and HC's): also with 2-byte streams
        getattr(lib, f"mhc_read_bwd_{suf}").argtypes = [p, p, p, p, p, p, p, p, i64, i32, i64, i32]
        getattr(lib, f"mhc_hc_fwd_{suf}").argtypes = [p] * 9 + [ctypes.c_double] + [p] * 6 + [i64, i32, i64, i32]
        getattr(lib, f"mhc_hc_bwd_{suf}").argtypes = [p] * 24 + [i64, i32, i64, i32]
        getattr(lib, f"mhc_pre_fwd_{suf}").argtypes = [p, p, p, i64, i32, i64, i32]
        getattr(lib, f"mhc_pre_bwd_{suf}").argtypes = [p, p, p, p, p, i64, i32, i64, i32]
        getattr(lib, f"mhc_post_res_fwd_{suf}").argtypes = [p, p, p, p, p, i64, i32, i64, i32]
        getattr(lib, f"mhc_post_res_bwd_{suf}").argtypes = [p, p, p, p, p, p, p, p, p, i64, i32, i64, i32]
        getattr(lib, f"mhc_coeffs_fwd_{suf}").argtypes = [p, p, p, p, p, ctypes.c_double, p, p, p, p, p, i64, i32,
                                                          i64, i32, i32]
        getattr(lib, f"mhc_coeffs_bwd_{suf}").argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, p, p, p, i64,
                                                          i32, i64, i32, i32]


def status() -> dict[str, object]:
    """``{"active": bool, "why": reason when inactive, "path": the library, "openmp": bool,
    "half_streams": the 2-byte stream dtypes the library takes, "isa": what it was built for,
    "avx512_matmuls": bool, "sinkhorn_lanes": tokens per vector of the float32 backward's Sinkhorn}``."""
    lib = _load()
    return {
        "active": lib is not None,
        "why": _STATE.get("why"),
        "path": _STATE.get("path"),
        "openmp": bool(lib.mhc_openmp()) if lib is not None else False,
        "half_streams": sorted(str(d) for d in _STATE.get("halves", ())) if lib is not None else [],
        "isa": _STATE.get("isa"),
        "avx512_matmuls": bool(_STATE.get("zmm")) if lib is not None else False,
        "sinkhorn_lanes": int(lib.mhc_sinkhorn_lanes()) if lib is not None else 0,
    }
