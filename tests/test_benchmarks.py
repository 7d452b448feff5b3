"""Smoke tests of the benchmark tools that other numbers in the README come from."""

from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks import step_timers
from mhckit import modules
from mhckit.ops import carry, cpu

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_step_timers_times_the_kernels_and_puts_everything_back(capsys):
    before = (cpu._call, modules.HyperConnection.split, carry.CoeffsCarryFunction.__dict__["backward"])
    threads = torch.get_num_threads()
    assert step_timers.main(["--steps", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("kernel mhc_coeffs_bwd", "kernel mhc_post_res_fwd", "CoeffsCarryFunction.backward",
                 "Python around the kernels", "12 sublayers"):
        assert line in out, out
    assert (cpu._call, modules.HyperConnection.split, carry.CoeffsCarryFunction.__dict__["backward"]) == before
    assert torch.get_num_threads() == threads
