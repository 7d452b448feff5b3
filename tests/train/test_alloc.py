"""The CPU heap settings of a training process (mhckit/train/alloc.py)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from mhckit.train import alloc
from mhckit.train import trainer as T
from tests.train.test_faults import config, data  # noqa: F401  (data: the module fixture)

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

_PROBE = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from mhckit.train.alloc import keep_freed_memory
        print(keep_freed_memory())
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # what a training step does: allocate its activations and free them. Blocks of ~4 MiB growing by
    # 64 KiB: glibc's dynamic mmap threshold (raised to the size of each freed mmapped block) never
    # catches up, so by default every block is mmapped and faulted in anew; kept, it is the heap's.
    sizes = [(1 << 20) + k * (1 << 14) for k in range(60)]  # float32 elements
    for s in sizes[:10]:
        a = torch.ones(s)
        del a
    f = faults()
    for s in sizes[10:]:
        a = torch.ones(s)
        del a
    print((faults() - f) / 50)
""")


def _faults(mode: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    *said, per_iteration = out.strip().splitlines()
    return float(per_iteration), " ".join(said)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_not_faulted_back_in():
    """Blocks of ~4 MiB allocated and freed 50 times: without the setting glibc maps each one anew and
    faults all of its pages in (~1500 per block); with it only the 64 KiB by which each block outgrows
    the previous one (~32)."""
    plain, _ = _faults("plain")
    kept, said = _faults("keep")
    assert said.startswith("freed memory kept"), said
    if plain < 50:
        pytest.skip(f"this glibc does not give the memory back here ({plain} faults per iteration): nothing to compare")
    assert kept < plain / 10, (plain, kept)


def test_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert alloc.keep_freed_memory().startswith("left alone")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_trainer_sets_it_on_the_cpu_unless_told_not_to(tmp_path, data):  # noqa: F811
    assert T.Trainer(config(tmp_path, "a"), data=data, log=lambda *a: None).heap.startswith("freed memory kept")
    off = T.Trainer(config(tmp_path, "b", keep_freed_memory=False), data=data, log=lambda *a: None)
    assert off.heap == "left alone"
