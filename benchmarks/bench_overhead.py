"""Where a variant's extra training-step time over the residual goes, with no timers inside the step.

    python -m benchmarks.bench_overhead [--preset default] [--variant mhc] [--steps 40]

Steps three GPTs of ``bench_model`` interleaved (rotating order, one process, fused AdamW, the trainer's
heap setting): the residual, the variant (on the compiled CPU kernels), and the same variant with every
compiled-kernel call made a no-op (``<variant>-no-kernels``: the same Python, the same autograd graph, the
same tensor allocations; the kernels' outputs are left as whatever memory they got, so its losses mean
nothing). Each step's forward, backward and optimizer step are timed apart. The variant minus its
no-kernel twin is what the kernels cost inside a training step; the twin minus the residual is
everything else: the Python around the kernels, the extra autograd nodes and parameters (36 more for
mHC's 12 sublayers), the optimizer on them, the wider streams' allocations. The kernels called from
the C++ pair (``mhckit/ops/cpu/_pair.py``, mHC's default where it builds) are counted and skipped
alike; ``--variant mhc-python-pair`` splits the step of mHC on the pair's Python Functions. The twin's paired ratio to
the residual bounds from above what faster kernels alone could reach.

Denormal floats are flushed to zero in all three models alike (the no-kernel twin's uninitialised
values could hold denormals, whose arithmetic is slow on x86; a real training step has none, so this
leaves the residual and the variant as they are). Unlike ``step_timers``, nothing wraps a call: the
split is a difference of two untouched runs, at the price of one more model in the rotation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_model import PRESETS, RESULTS, VARIANTS, _ops_of, build, variant_ops
from benchmarks.harness import Result, command_line, save_results
from mhckit.ops import cpu
from mhckit.ops.cpu import _pair
from mhckit.train.alloc import keep_freed_memory

PHASES = ("forward", "backward", "optimizer")


@contextlib.contextmanager
def kernel_calls(calls: list[int], run: bool = True):
    """Inside the block ``calls[0]`` counts the compiled-kernel calls, from Python (``mhckit.ops.cpu``)
    and from the C++ pair (``mhckit/ops/cpu/_pair.py``), which run as usual or, without ``run``, return
    at once having done nothing; the real entry points are back afterwards."""
    real = cpu._call

    def call(name, dtype, *args):
        calls[0] += 1
        if run:
            real(name, dtype, *args)

    cpu._call = call
    try:
        with _pair.kernel_calls(calls, run):
            yield
    finally:
        cpu._call = real


def phased_step(model, opt, tokens, ops: dict, around):
    """One training step as ``bench_model.step_fn`` makes it, returning the seconds of its forward,
    backward and optimizer step; ``around()`` is a context entered for the whole step."""

    def step() -> tuple[float, float, float]:
        with around():
            t0 = time.perf_counter()
            with variant_ops(**ops):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                t1 = time.perf_counter()
                loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--variant", default="mhc", help="a bench_model variant on the compiled CPU kernels (default: mhc)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runnable = [v for v, s in VARIANTS.items() if v != "residual" and s.get("cpu_kernels", True)
                and not s.get("traced") and not s.get("separate")]
    if args.variant not in runnable:
        raise SystemExit(f"--variant: got {args.variant!r}; expected one of {', '.join(runnable)}")
    if args.steps < 1:
        raise SystemExit(f"--steps: got {args.steps}; expected at least 1")
    if not cpu.status()["active"]:
        raise SystemExit(f"the compiled CPU kernels are not active: {cpu.status()['why']}")
    heap = keep_freed_memory()  # as the trainer and bench_model
    print("heap:", heap)
    preset, name = PRESETS[args.preset], args.variant
    twin = f"{name}-no-kernels"
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq_len"] + 1))
    calls = {n: [0] for n in ("residual", name, twin)}
    steps = {}
    for n, spec, run in (("residual", VARIANTS["residual"], True), (name, VARIANTS[name], True),
                         (twin, VARIANTS[name], False)):
        model, opt = build(preset, spec, "cpu", "auto")
        steps[n] = phased_step(model, opt, tokens, _ops_of(spec), lambda c=calls[n], r=run: kernel_calls(c, r))
    names = list(steps)
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    torch.set_flush_denormal(True)
    try:
        for n in names:
            for _ in range(args.warmup):
                steps[n]()
        per_step = {n: calls[n][0] / args.warmup for n in names}  # kernel calls per step
        for r in range(args.steps):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n].append(steps[n]())
    finally:
        torch.set_flush_denormal(False)
    whole = {n: [sum(t) for t in times[n]] for n in names}
    med = {n: [statistics.median(t[i] for t in times[n]) for i in range(3)] for n in names}
    results = []
    for n in names:
        ratios = sorted(b / t for t, b in zip(whole[n], whole["residual"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else (ratios[0], ratios[-1])
        params = {"preset": args.preset, "variant": n, "kernel_calls_per_step": per_step[n],
                  **{f"{ph}_ms": round(1e3 * m, 2) for ph, m in zip(PHASES, med[n])}}
        results.append(Result(n, 1e3 * statistics.median(whole[n]), statistics.median(ratios), (q[0], q[-1]),
                              args.steps, params))
        print(f"{n:22s} {1e3 * statistics.median(whole[n]):8.2f} ms/step  x{statistics.median(ratios):.3f} "
              f"vs residual  " + "  ".join(f"{ph} {1e3 * m:6.2f}" for ph, m in zip(PHASES, med[n]))
              + f"  ({per_step[n]:g} kernel calls)")
    print(f"{name}'s extra time over the residual, by phase (medians, ms):")
    for i, ph in enumerate(PHASES):
        kernels, rest = med[name][i] - med[twin][i], med[twin][i] - med["residual"][i]
        print(f"  {ph:10s} kernels {1e3 * kernels:6.2f}   everything else {1e3 * rest:6.2f}")
    stem = Path(args.out) if args.out else RESULTS / f"model_{args.preset}_cpu_overhead"
    save_results(results, stem, command_line(__spec__ and __spec__.name, argv),
                 f"  (ratio column = throughput relative to residual; {twin}: kernel calls skipped, wrong values)",
                 heap=heap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
