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
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


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
