"""Smoke tests of the benchmark tools that other numbers in the README come from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_step_timers_times_another_variant(capsys):
    """``--variant hc``: HC's kernels and Functions are timed (not mHC's), and a bad variant is named."""
    before = carry.HCCarryFunction.__dict__["backward"]
    assert step_timers.main(["--steps", "2", "--variant", "hc"]) == 0
    out = capsys.readouterr().out
    for line in ("kernel mhc_hc_bwd", "kernel mhc_hc_fwd", "HCCarryFunction.backward", "hc's extra time"):
        assert line in out, out
    assert "mhc_coeffs" not in out and "CoeffsCarryFunction" not in out, out
    assert carry.HCCarryFunction.__dict__["backward"] is before
    with pytest.raises(SystemExit, match="--variant: got 'nope'"):
        step_timers.main(["--variant", "nope"])


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_layer_benchmark_in_bfloat16_casts_every_case(tmp_path, kernel_calls):
    """``bench_layer --dtype bfloat16``: every case runs on bf16 tensors (mhckit's on the bf16 kernels)
    and the results say so."""
    from benchmarks import bench_layer

    stem = tmp_path / "layer"
    assert bench_layer.main(["--B", "1", "--T", "8", "--C", "16", "--branch", "linear", "--rounds", "1",
                             "--no-peers", "--dtype", "bfloat16", "--out", str(stem)]) == 0
    assert kernel_calls and {dt for _, dt in kernel_calls} == {torch.bfloat16}
    rows = (stem.with_suffix(".csv")).read_text()
    assert "bfloat16" in rows and "mhckit-torch-ops" in rows and "float32" not in rows.split("\n", 1)[1]


def test_commit_tag_ignores_rewritten_results(tmp_path):
    """Results carry the commit, '+dirty' when tracked code changed, but not for files under
    benchmarks/results/ (a second benchmark run in one checkout finds the first one's files rewritten)."""
    import subprocess

    from mhckit.train.runinfo import _commit_of

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    clean = _commit_of(tmp_path)
    assert len(clean) == 12 and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("new\n")
    assert _commit_of(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _commit_of(tmp_path) == clean + "+dirty"


@pytest.mark.slow
def test_gpu_suite_plumbing_on_the_cpu(tmp_path):
    """benchmarks/gpu_suite.sh end to end without a GPU (Triton interpreter, the default preset on the
    CPU): every step runs and writes its files, so a lent GPU's few minutes are not lost to a broken
    script."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, MHCKIT_GPU_CHECK_CPU="1", MODEL_DEVICE="cpu",
               MODEL_PRESET="default", MODEL_STEPS="2", TEST_TIMEOUT="5", BENCH_TIMEOUT="400",
               MODEL_TIMEOUT="300", PROFILE_TIMEOUT="300", MODEL_COMPILE="0", MHCKIT_BENCH_DTYPES="float32")
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "gpu_suite_summary.txt").read_text()
    for line in ("gpu_check: OK", "model (eager): OK", "profile: OK"):
        assert line in summary, summary
    for name in ("gpu_check.csv", "gpu_check.md", "model_default_cpu.md", "profile_default_cpu.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "triton-pair" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_benchmarks_compare_two_kernel_builds(tmp_path):
    """``bench_ops --backends torch@avx2,torch`` and ``bench_model``'s ``mhc-avx2`` variant time the
    AVX2 build next to the process's own one (the README's AVX-512 numbers come from them)."""
    from benchmarks import bench_model, bench_ops

    own = cpu.status()
    assert bench_ops.main(["--tokens", "16", "--C", "8", "--n", "4", "--ops", "coeffs", "--modes", "fwd+bwd,bwd",
                           "--backends", "torch@avx2,torch", "--rounds", "1", "--out", str(tmp_path / "ops")]) == 0
    rows = (tmp_path / "ops.csv").read_text().splitlines()[1:]
    assert sum(",torch@avx2," in r for r in rows) == 2 and sum(",torch," in r for r in rows) == 2
    assert bench_model.main(["--variants", "residual,mhc-avx2", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path / "model")]) == 0
    assert "mhc-avx2" in (tmp_path / "model.md").read_text()
    assert cpu.status() == own


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_model_benchmark_times_mhc_lite_on_the_pair_and_as_separate_ops(tmp_path, monkeypatch):
    """``mhc-lite`` runs the fused pair (the kernels' permutation tail: its Python Functions, or the C++
    ones where they build), ``mhc-lite-separate`` does not."""
    from benchmarks import bench_model
    from mhckit.ops import carry
    from mhckit.ops.cpu import _pair

    used = []
    real = carry.CoeffsCarryFunction.forward

    def spy(ctx, x, phi, bias, alpha, iters, *rest):
        used.append((iters, carry.pair_enabled()))
        return real(ctx, x, phi, bias, alpha, iters, *rest)

    monkeypatch.setattr(carry.CoeffsCarryFunction, "forward", staticmethod(spy))
    if _pair.load():
        real_cpp = _pair._STATE["read"]

        def spy_cpp(x, phi, bias, alpha, iters, *rest):
            used.append((iters, carry.pair_enabled()))
            return real_cpp(x, phi, bias, alpha, iters, *rest)

        monkeypatch.setitem(_pair._STATE, "read", spy_cpp)
    assert bench_model.main(["--variants", "mhc-lite-separate", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path / "sep")]) == 0
    assert not used
    assert bench_model.main(["--variants", "mhc-lite", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path / "pair")]) == 0
    assert used and {u for u in used} == {(cpu.PERMUTATIONS, True)}
    assert "mhc-lite" in (tmp_path / "pair.md").read_text()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_model_benchmark_times_static_hc_on_the_pair_and_as_separate_ops(tmp_path, monkeypatch):
    """``hc-static`` builds HC without its dynamic terms and runs its read on the pair
    (ReadCarryFunction, or its C++ twin), ``hc-static-separate`` does not; neither runs the dynamic HC
    kernels."""
    from benchmarks import bench_model
    from mhckit.ops.cpu import _pair

    called = []
    real = cpu._call
    monkeypatch.setattr(cpu, "_call", lambda name, dt, *args: (called.append(name), real(name, dt, *args))[1])
    if _pair.load():  # the C++ pair calls the kernels itself: its read stands for mhc_read_bwd, its HC for mhc_hc_fwd
        for key, name in (("pre", "mhc_read_bwd"), ("hc", "mhc_hc_fwd")):
            monkeypatch.setitem(_pair._STATE, key, lambda *a, _n=name, _r=_pair._STATE[key]: called.append(_n) or _r(*a))
    assert bench_model.main(["--variants", "hc-static-separate", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path / "sep")]) == 0
    assert "mhc_read_bwd" not in called and "mhc_hc_fwd" not in called
    called.clear()
    assert bench_model.main(["--variants", "hc-static", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path / "pair")]) == 0
    assert "mhc_read_bwd" in called and "mhc_hc_fwd" not in called
    assert "hc-static" in (tmp_path / "pair.md").read_text()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_route_benchmark_times_both_routes(tmp_path, monkeypatch):
    """``bench_route`` times the coefficient op with its matmuls forced into the kernel and into BLAS
    (where ``PROJECT_MAX_COLUMNS``' default comes from), restores the thresholds, names the default route."""
    from benchmarks import bench_route

    saved, real, routes = (cpu.PROJECT_MAX_WIDTH, cpu.PROJECT_MAX_COLUMNS), cpu._call, set()

    def spy(name, dt, *args):  # which route each coefficient forward took, per n
        if name == "mhc_coeffs_fwd":
            routes.add((args[-4], args[1] is not None))
        return real(name, dt, *args)

    monkeypatch.setattr(cpu, "_call", spy)
    assert bench_route.main(["--tokens", "16", "--n", "4,8", "--C", "8", "--rounds", "1",
                             "--out", str(tmp_path / "route")]) == 0
    assert routes == {(4, True), (4, False), (8, True), (8, False)}
    assert (cpu.PROJECT_MAX_WIDTH, cpu.PROJECT_MAX_COLUMNS) == saved
    rows = [r.split(",") for r in (tmp_path / "route.csv").read_text().splitlines()]
    col = {name: i for i, name in enumerate(rows[0])}
    got = {(r[col["n"]], r[col["case"]]): r[col["default_route"]] for r in rows[1:]}
    assert got == {("4", "kernel"): "kernel", ("4", "blas"): "kernel", ("8", "kernel"): "blas", ("8", "blas"): "blas"}


def test_results_name_the_cpu_kernel_build(monkeypatch):
    """Every result's run info says which CPU kernel build ran (results depend on it), or why none did."""
    from mhckit.train.runinfo import cpu_kernels, run_info

    st = cpu.status()
    info = run_info()
    want = (f"{st['isa']} build, " + ("OpenMP" if st["openmp"] else "no OpenMP")) if st["active"] else f"off ({st['why']})"
    assert info["cpu_kernels"] == want
    monkeypatch.setattr(cpu, "status", lambda: {"active": False, "why": "no C compiler found", "isa": None})
    assert run_info()["cpu_kernels"] == "off (no C compiler found)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run that has not loaded them
    monkeypatch.delitem(cpu._STATE, "lib", raising=False)
    assert cpu_kernels() == "not loaded"


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
cache size\t: 1024 KB

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: another CPU
"""
INTEL_CPUINFO = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
stepping\t: 8
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_results_name_the_cpu_precisely():
    """Two hosts sold as the same 2-core CPU timed the same code differently: a result names the CPU's
    model, family / model / stepping and cache sizes (the first processor's), so results of different
    hosts are not compared as one machine's; the report still reads the core count from it."""
    from mhckit.train.report import _cores
    from mhckit.train.runinfo import describe_cpu, hardware

    caches = {"L3": "32768K", "L2": "1024K"}
    assert describe_cpu(AMD_CPUINFO, caches, "x86_64", "fb") == (
        "AMD EPYC (x86_64 family 26 model 2 stepping 1; L2 1024K, L3 32768K)")
    assert describe_cpu(INTEL_CPUINFO, {}, "x86_64", "fb") == (
        "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (x86_64 family 6 model 143 stepping 8)")
    assert describe_cpu(ARM_CPUINFO, {"L2": "2048K"}, "aarch64", "fb") == (
        "Arm CPU implementer 0x41 part 0xd0c (L2 2048K)")
    assert describe_cpu("", caches, "x86_64", "x86_64 CPU") == "x86_64 CPU"
    hw = hardware()
    if not torch.cuda.is_available():
        assert hw.endswith(f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
        assert _cores(hw) == os.cpu_count()
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        if names:
            assert hw.startswith(names[0] + " ("), hw  # the name and more than the architecture's


def test_results_start_with_the_command_that_made_them(tmp_path, monkeypatch):
    """A committed result says how to make it again: ``python -m benchmarks.<module> <arguments>``
    (a script run by path keeps its path), first in its metadata, in the markdown and the CSV; a
    benchmark's ``main`` records its own arguments, not those of whatever called it."""
    import json
    import sys

    from benchmarks import bench_route, harness

    args = ["--dtype", "bfloat16", "--variants", "residual,mhc", "--out", "a b"]
    cmd = harness.command_line("benchmarks.bench_model", args)
    assert cmd == "python -m benchmarks.bench_model --dtype bfloat16 --variants residual,mhc --out 'a b'"
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_model.py", *args])
    assert harness.command_line(None) == "python benchmarks/bench_model.py " + cmd.split(" ", 3)[3]
    res = [harness.Result("residual", 1.0, 1.0, (1.0, 1.0), 3, {"preset": "default"})]
    harness.write_results(res, tmp_path / "r", {"commit": "abc"}, command=cmd)
    md = (tmp_path / "r.md").read_text()
    assert md.index('"command": ' + json.dumps(cmd)) < md.index('"commit"')
    header, row = (tmp_path / "r.csv").read_text().splitlines()[:2]
    assert header.split(",")[-2:] == ["command", "commit"] and row.endswith(",abc") and "bench_model --dtype" in row
    # a benchmark run from here (pytest's argv): the results name the benchmark and its arguments
    monkeypatch.setattr(bench_route, "compare", lambda cases, baseline, **kw: [
        harness.Result(c, 1.0, 1.0, (1.0, 1.0), 1, dict(kw.get("params") or {})) for c in cases])
    stem = tmp_path / "route"
    assert bench_route.main(["--out", str(stem)]) == 0
    meta = json.loads(stem.with_suffix(".md").read_text().split("```")[1])
    assert meta["command"] == f"python -m benchmarks.bench_route --out {stem}"


def test_median_ci_order_statistics_and_coverage():
    """The interval is the pair of order statistics the binomial gives (n = 40: x_(13), x_(26); 160:
    x_(67), x_(92)); it holds the median, is (min, max) for n < 6, and in repeated draws misses the
    true median at most about 5 % of the time."""
    import random
    import statistics

    from benchmarks.harness import median_ci

    assert median_ci(range(40)) == (13, 26) and median_ci(range(160)) == (67, 92)
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0) and median_ci(range(6)) == (0, 5)
    assert median_ci(range(10), level=0.5) == (3, 6)
    rng = random.Random(0)
    for n in (7, 40, 161):
        v = [rng.expovariate(1.0) for _ in range(n)]
        lo, hi = median_ci(v)
        assert lo <= statistics.median(v) <= hi
    misses = 0
    for _ in range(2000):
        lo, hi = median_ci([rng.gauss(0.0, 1.0) for _ in range(40)])
        misses += not lo <= 0.0 <= hi
    assert 0.01 < misses / 2000 < 0.06
    with pytest.raises(ValueError, match="values"):
        median_ci([])
    with pytest.raises(ValueError, match="level"):
        median_ci([1.0], level=1.0)


def test_every_committed_cpu_result_is_made_by_a_make_target():
    """`make bench-cpu` and `make bench-cpu-more` make every committed CPU result again: the command each
    result file starts with is one of those targets' lines (the one-off of an older commit excepted)."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    lines = set()
    for target in ("bench-cpu", "bench-cpu-more"):
        recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert recipe, target
        lines |= {ln.strip().replace("$(PY)", "python") for ln in recipe.group(1).splitlines()
                  if "-m benchmarks." in ln}
    one_offs = {"model_default_cpu_hc_before"}  # an older commit's run, kept for comparison (Makefile says so)
    results = sorted((root / "benchmarks" / "results").glob("*.md"))
    assert len(results) > 20
    for md in results:
        meta = json.loads(md.read_text().split("```")[1])
        if md.stem in one_offs:
            continue
        assert meta.get("command") in lines, f"{md.name}: {meta.get('command')!r} is no line of the bench targets"


def test_generation_benchmark_times_the_original_and_each_retrofit(tmp_path):
    """``bench_generate``: greedy generation of the unmodified Llama and of each retrofitted copy, interleaved,
    ratios against the original, the results with their command."""
    pytest.importorskip("transformers")
    import json

    from benchmarks import bench_generate

    stem = tmp_path / "gen"
    assert bench_generate.main(["--layers", "1", "--prompt", "3", "--new-tokens", "2", "--rounds", "1",
                                "--warmup", "0", "--variants", "mhc,identity", "--out", str(stem)]) == 0
    md = stem.with_suffix(".md").read_text()
    rows = [ln.split(" | ") for ln in md.splitlines() if ln.startswith("| ") and "case" not in ln]
    assert [r[-3] for r in rows] == ["original", "mhc", "identity"] and rows[0][-1].startswith("1.000")
    assert json.loads(md.split("```")[1])["command"].startswith("python -m benchmarks.bench_generate --layers 1")
    with pytest.raises(SystemExit, match="--new-tokens: got 0"):
        bench_generate.main(["--new-tokens", "0"])


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the compiled CPU kernels cannot be built")
def test_overhead_benchmark_skips_every_kernel_call_of_the_twin_and_only_its(tmp_path):
    """``bench_overhead``: the no-kernel twin makes the same kernel calls per step as the variant, none of
    which runs (a buffer the real kernel would overwrite keeps its sentinel), the residual makes none;
    the kernels' entry point is back afterwards; a variant it cannot split is named."""
    import csv

    from benchmarks import bench_overhead

    real = cpu._call
    x, g = torch.randn(8, 4, 16), torch.full((8, 4, 16), 7.0)
    phi, bias, alpha = torch.randn(64, 24) * 0.1, torch.zeros(24), torch.full((3,), 0.01)
    _, _, _, r, z, _ = cpu.coeffs_fwd(x, phi, bias, alpha, 1e-6, 20, True)
    calls = [0]
    with bench_overhead.kernel_calls(calls, run=False):
        cpu.coeffs_bwd(x, None, z, r, phi, bias, alpha, None, None, None, 20, True, True, g_out=g, gx_out=g)
    assert calls == [1] and torch.equal(g, torch.full_like(g, 7.0))
    cpu.coeffs_bwd(x, None, z, r, phi, bias, alpha, None, None, None, 20, True, True, g_out=g, gx_out=g)
    assert not torch.equal(g, torch.full_like(g, 7.0))  # the sentinel can fail: the real kernel writes gx
    assert bench_overhead.main(["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "o")]) == 0
    assert cpu._call is real
    rows = {row["case"]: row for row in csv.DictReader((tmp_path / "o.csv").open())}
    assert set(rows) == {"residual", "mhc", "mhc-no-kernels"}
    per_step = {c: float(row["kernel_calls_per_step"]) for c, row in rows.items()}
    # 12 sublayers x 4, less the 11 write-back backwards joined to the next coefficient backward (C++ pair)
    from mhckit.ops.cpu import _pair

    joined = 11 if _pair.active() else 0
    assert per_step["residual"] == 0 and per_step["mhc"] == per_step["mhc-no-kernels"] == 48 - joined
    for row in rows.values():
        assert all(float(row[f"{ph}_ms"]) > 0 for ph in bench_overhead.PHASES)
    with pytest.raises(SystemExit, match="--variant: got 'mhc-separate'"):
        bench_overhead.main(["--variant", "mhc-separate"])
