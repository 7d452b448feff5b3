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
    for _ in range(3):
        torch.ones(1 << 21), torch.ones(1 << 18)
    f = faults()
    for _ in range(20):  # what a training step does: allocate its activations, free them all, again
        a, b = torch.ones(1 << 21), torch.ones(1 << 18)
        del a, b
    print((faults() - f) / 20)
""")


def _faults(mode: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    *said, per_iteration = out.strip().splitlines()
    return float(per_iteration), " ".join(said)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_not_faulted_back_in():
    """8 MiB + 1 MiB allocated and freed 20 times: without the setting glibc gives the memory back and
    faults it in again each time; with it, no page faults."""
    plain, _ = _faults("plain")
    kept, said = _faults("keep")
    assert said.startswith("freed memory kept"), said
    if plain < 50:
        pytest.skip(f"this glibc does not give the memory back here ({plain} faults per iteration): nothing to compare")
    assert kept < 5, (plain, kept)


def test_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert alloc.keep_freed_memory().startswith("left alone")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_trainer_sets_it_on_the_cpu_unless_told_not_to(tmp_path, data):  # noqa: F811
    assert T.Trainer(config(tmp_path, "a"), data=data, log=lambda *a: None).heap.startswith("freed memory kept")
    off = T.Trainer(config(tmp_path, "b", keep_freed_memory=False), data=data, log=lambda *a: None)
    assert off.heap == "left alone"
