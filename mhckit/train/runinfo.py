"""What every result carries: commit, versions, hardware and the CPU kernel build."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit (``+dirty`` if tracked files changed), ``$MHCKIT_COMMIT``, or ``unknown``.
    Changes under ``benchmarks/results/`` do not count: a benchmark run after another one in the same
    checkout finds that one's results rewritten, and the code it measures is the commit's."""
    return _commit_of(Path(__file__).resolve().parents[2])


def _commit_of(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MHCKIT_COMMIT", "unknown")


def hardware() -> str:
    """The GPU's name, or the CPU's identity (:func:`cpu_model`), its core count and torch's threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU, precisely enough to tell two hosts apart: on Linux the name, x86 family / model /
    stepping (``/proc/cpuinfo``) and the L2 / L3 sizes (sysfs), e.g. ``AMD EPYC (x86_64 family 26
    model 2 stepping 1; L2 1024K, L3 32768K)``; elsewhere the platform's processor name. Two virtual
    machines sold as the same "2-core CPU" have given different timings for the same code (the README's
    training table), so every result says which CPU it came from."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind == "Unified":
            caches[f"L{level}"] = size
    return describe_cpu(info, caches, platform.machine(), fallback=f"{platform.processor() or platform.machine()} CPU")


def describe_cpu(cpuinfo: str, caches: dict[str, str], machine: str, fallback: str) -> str:
    """:func:`cpu_model`'s text from a ``/proc/cpuinfo`` dump (its first processor), the unified cache
    sizes by level (``{"L2": "1024K"}``) and the architecture (``platform.machine()``); ``fallback``
    when the dump names no CPU. Arm dumps name none but their implementer and part numbers."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name and fields.get("CPU implementer") and fields.get("CPU part"):
        name = f"Arm CPU implementer {fields['CPU implementer']} part {fields['CPU part']}"
    if not name:
        return fallback
    ids = [f"{k} {fields[k2]}" for k, k2 in (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
           if fields.get(k2)]
    parts = [f"{machine} " + " ".join(ids)] if ids else []
    sizes = [f"{level} {caches[level]}" for level in sorted(caches)]
    if sizes:
        parts.append(", ".join(sizes))
    return f"{name} ({'; '.join(parts)})" if parts else name


def cpu_kernels() -> str:
    """Which compiled CPU kernels this process runs (results depend on the build: mhckit.ops.cpu):
    the instruction set they were built for, or why there are none."""
    from mhckit.ops import cpu

    if torch.cuda.is_available() and "lib" not in cpu._STATE:  # a GPU run: do not build (or warn about) them
        return "not loaded"
    st = cpu.status()
    if not st["active"]:
        return f"off ({st['why']})"
    return f"{st['isa']} build" + (", OpenMP" if st["openmp"] else ", no OpenMP")


def run_info() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "hardware": hardware(),
        "cpu_kernels": cpu_kernels(),
    }
