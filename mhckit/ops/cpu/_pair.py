"""The fused sublayer pair (:class:`mhckit.ops.carry.CoeffsCarryFunction`, ``HCCarryFunction``,
``ReadCarryFunction`` and ``PostCarryFunction``) as C++ autograd Functions (``mhc_pair.cpp``), which
:mod:`mhckit.functional` runs instead of the Python ones whenever it can (eager, autograd on, the C
kernels on; mHC, mHC-lite, the identity variant, dynamic and static HC, every stream dtype the kernels
take).

They call the same C kernels (their addresses handed over once from the ctypes library) with the
same arguments, so they give the Python pair's outputs and gradients bit for bit; what they save is
the Python around the kernels. At the default ``mhckit compare`` width a training step spent more
time in the pair's Python (the Functions' bodies, their ``apply``, the kernels' wrappers, all several
times slower inside a step than in a loop) than in its write-back kernels; with the C++ pair a
sublayer's forward is two dispatcher calls from Python and its backward runs no Python at all
(``docs/measurements.md``).

Built on first use with the system C++ compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``)
against the installed torch's own headers (no Python headers, no ninja; ~30 s on a 2-core CPU, once
per source, compiler and torch), and loaded with :func:`torch.ops.load_library`. The library is kept
in ``$MHCKIT_CACHE/kernels`` (default ``~/.cache/mhckit/kernels``) beside the C kernels; a build found
in the default cache is also used when ``$MHCKIT_CACHE`` points elsewhere (a data cache of its own
need not rebuild it). ``make setup`` builds it ahead (``mhckit kernels``).

Where it cannot run (no C++ compiler, a failed build, a torch whose headers do not compile it)
mhckit warns once and keeps the Python pair; ``MHCKIT_CPP_PAIR=0`` keeps the Python pair for a
process, :func:`use_cpp_pair` inside a block; :func:`status` says which runs and why. The Python pair
also stays for what the C++ one does not take: the Triton kernels, ``torch.compile`` (the custom ops
of :mod:`mhckit.ops.carry_ops`), a write-back whose ``y`` differs from the streams in dtype. Kernels
switched off (:func:`mhckit.ops.cpu.disabled`) between a forward and its backward: the C++ backward
still runs them (the Python ones fall back to PyTorch ops; same sums).
The backward is differentiable once, as the Python pair's (``once_differentiable``): a
``create_graph=True`` backward through it raises.

One thing the Python pair does not do: where a sublayer's x is the previous sublayer's C++ write-back
output (mHC, mHC-lite, the identity; fp32 / fp64 streams; the projection in the kernel), the coefficient
backward, whose dx is that write-back's output gradient, also runs the write-back's backward (dy, dh_post)
on each block of dx while it is in cache (``mhc_coeffs_bwd_post``), and the write-back's backward returns
those results, bitwise its own, if the gradient it receives is that very dx, unchanged (no other use of
the output added to it, no hook replaced or modified it); else it computes them itself. One pass over the
stream gradient fewer per sublayer: the default ``compare`` GPT step 0.994-0.995x the time (two
interleaved runs, Intel host). ``torch.ops.mhckit_pair.joined()`` counts the joined backwards,
``set_join(False)`` switches it off (tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from ._library import _STATE as _KERNELS, _cached, _compile_to, _load

_SOURCE = Path(__file__).with_name("mhc_pair.cpp")
_ABI = 3
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "ok": bool, "why": str | None, "path": str
_ON = [os.environ.get("MHCKIT_CPP_PAIR", "1") != "0"]
_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-c++20-extensions"]
_DTYPES = ("f32", "f64", "bf16", "f16")  # mhc_pair.cpp's order
_KERNEL_NAMES = ("mhc_coeffs_fwd", "mhc_coeffs_bwd", "mhc_post_res_fwd", "mhc_post_res_bwd", "mhc_hc_fwd", "mhc_hc_bwd",
                 "mhc_pre_fwd", "mhc_read_bwd", "mhc_coeffs_bwd_post")  # mhc_pair.cpp's order


def _cxx() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _torch_flags() -> list[str]:
    root = Path(torch.__file__).parent
    inc, lib = root / "include", root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", f"-L{lib}",
            "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _build(cxx: str, out: Path) -> str | None:
    return _compile_to(out, [[cxx, *_FLAGS, str(_SOURCE)]], _torch_flags(), timeout=600)


def _kernel_table(lib: ctypes.CDLL) -> list[int]:
    """The entry points' addresses in mhc_pair.cpp's order (0 where the build has no such dtype)."""
    halves = _KERNELS.get("halves", ())
    have = {"f32": True, "f64": True, "bf16": torch.bfloat16 in halves, "f16": torch.float16 in halves}
    only = {"mhc_coeffs_bwd_post": ("f32", "f64")}  # entry points not built for every stream dtype
    return [ctypes.cast(getattr(lib, f"{name}_{suf}"), ctypes.c_void_p).value
            if have[suf] and suf in only.get(name, _DTYPES) else 0
            for name in _KERNEL_NAMES for suf in _DTYPES]


def hand_over(lib: ctypes.CDLL | None) -> None:
    """Give the loaded C++ pair the entry points of ``lib`` (:func:`mhckit.ops.cpu.use_isa` switches
    builds); nothing if the pair is not loaded."""
    if _STATE.get("ok") and lib is not None:
        torch.ops.mhckit_pair.set_kernels(_kernel_table(lib))


def load() -> bool:
    """Build (once per source, compiler and torch) and load the C++ pair; False (and a warning, once)
    if it cannot run here."""
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    with _LOCK:
        if "ok" in _STATE:
            return bool(_STATE["ok"])
        ok, why = False, None
        lib = _load()
        if lib is None:
            why = f"the C kernels are unavailable ({_KERNELS.get('why')})"
        elif (cxx := _cxx()) is None:
            why = "no C++ compiler found (set CXX, or install g++ / clang++)"
        else:
            key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(
                [cxx, *_FLAGS, torch.__version__, Path(torch.__file__).parent.as_posix(), sys.platform]).encode()
            ).hexdigest()[:16]
            path = _cached("libmhc_pair.so", key)
            _STATE["path"] = str(path)
            if not path.exists():
                print(f"mhckit: building the C++ mHC pair with {cxx} (once per torch version, ~30 s on 2 cores) "
                      f"into {path.parent}", file=sys.stderr, flush=True)
                try:
                    why = _build(cxx, path)
                except OSError as e:
                    why = f"cannot build in {path.parent}: {e} (set MHCKIT_CACHE to a writable directory)"
            if why is None:
                try:
                    torch.ops.load_library(str(path))
                    if torch.ops.mhckit_pair.abi_version() != _ABI:
                        why = f"{path}: ABI {torch.ops.mhckit_pair.abi_version()}, expected {_ABI}"
                    else:
                        torch.ops.mhckit_pair.set_kernels(_kernel_table(lib))
                        ok = True
                except (OSError, RuntimeError) as e:
                    why = f"{path}: {e}"
        if not ok:
            warnings.warn(f"mhckit: the C++ pair is unavailable ({why}); using the Python pair", stacklevel=3)
        else:
            _STATE["read"] = torch.ops.mhckit_pair.coeffs_carry.default
            _STATE["write"] = torch.ops.mhckit_pair.post_carry.default
            _STATE["hc"] = torch.ops.mhckit_pair.hc_carry.default
            _STATE["pre"] = torch.ops.mhckit_pair.read_carry.default
        _STATE["ok"], _STATE["why"] = ok, why
        return ok


def active() -> bool:
    """Whether :mod:`mhckit.functional` runs the C++ pair now (switched on, and it loads)."""
    return _ON[0] and load()


@contextlib.contextmanager
def use_cpp_pair(on: bool = True):
    """Inside this block mhckit runs (``on``) or does not run the C++ pair."""
    before, _ON[0] = _ON[0], on
    try:
        yield
    finally:
        _ON[0] = before


@contextlib.contextmanager
def kernel_calls(calls: list[int], run: bool = True):
    """For benchmarks: inside the block ``calls[0]`` also counts the C++ pair's kernel calls, which run
    as usual or, without ``run``, return at once having done nothing (outputs left as allocated)."""
    if not load():
        yield
        return
    ops = torch.ops.mhckit_pair
    start = ops.calls()
    ops.set_skip(not run)
    try:
        yield
    finally:
        ops.set_skip(False)
        calls[0] += ops.calls() - start


def status() -> dict[str, object]:
    """``{"on": switched on, "active": it runs, "why": why not, "path": the library}`` (``active``
    builds it if needed)."""
    return {"on": _ON[0], "active": active(), "why": _STATE.get("why"), "path": _STATE.get("path")}

