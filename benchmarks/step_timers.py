"""Inside a CPU training step: how long mHC's compiled kernels and the Python around them take.

    python -m benchmarks.step_timers [--preset default] [--steps 30]

Steps a residual and an mHC GPT alternately (as ``bench_model``) and times, per mHC step, every
compiled-kernel call (``mhckit.ops.cpu``), every forward / backward of the sublayer's two autograd
Functions (``mhckit.ops.carry``; these include the kernel calls) and ``HyperConnection.split`` with
its write-back (which include the forward Functions). Prints medians per step and per sublayer,
and how mHC's extra time over the residual splits into kernels, the Python around them and the rest. The timers themselves add a few
microseconds per call. The kernels' time outside a training step (data in cache) is the C harness's
business: see the README's Speed section.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch

from benchmarks.bench_model import PRESETS, VARIANTS, build, step_fn
from mhckit import modules
from mhckit.ops import carry, cpu
from mhckit.train.alloc import keep_freed_memory


@contextlib.contextmanager
def instrumented(acc: collections.Counter):
    """Inside the block, the kernel calls, the carry Functions and ``HyperConnection.split`` add their
    wall time to ``acc``; the originals are back afterwards."""
    saved = [(cpu, "_call", cpu._call), (modules.HyperConnection, "split", modules.HyperConnection.split)]
    saved += [(cls, m, cls.__dict__[m]) for cls in (carry.CoeffsCarryFunction, carry.PostCarryFunction)
              for m in ("forward", "backward")]
    try:
        _instrument(acc)
        yield acc
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _instrument(acc: collections.Counter) -> None:
    call = cpu._call

    def timed_call(name, dtype, *args):
        t = time.perf_counter()
        call(name, dtype, *args)
        acc["kernel " + name] += time.perf_counter() - t

    cpu._call = timed_call
    for cls in (carry.CoeffsCarryFunction, carry.PostCarryFunction):
        for meth in ("forward", "backward"):
            fn = getattr(cls, meth)

            def timed(*args, _fn=fn, _key=f"{cls.__name__}.{meth}"):
                t = time.perf_counter()
                out = _fn(*args)
                acc[_key] += time.perf_counter() - t
                return out

            setattr(cls, meth, staticmethod(timed))
    split = modules.HyperConnection.split

    def timed_split(self, x):
        t = time.perf_counter()
        u, finish = split(self, x)
        acc["split (read, incl. its Function)"] += time.perf_counter() - t

        def timed_finish(y):
            t = time.perf_counter()
            out = finish(y)
            acc["finish (write-back, incl. its Function)"] += time.perf_counter() - t
            return out

        return u, timed_finish

    modules.HyperConnection.split = timed_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    if not cpu.status()["active"]:
        raise SystemExit(f"the compiled CPU kernels are not active: {cpu.status()['why']}")
    print("heap:", keep_freed_memory())  # as the trainer and bench_model
    preset = PRESETS[args.preset]
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq_len"] + 1))
    runs = {n: build(preset, VARIANTS[n], "cpu", "auto") for n in ("residual", "mhc")}
    steps = {n: step_fn(m, o, tokens, "cpu") for n, (m, o) in runs.items()}
    sublayers = sum(1 for m in runs["mhc"][0].modules() if isinstance(m, modules.HyperConnection))
    times: dict[str, list[float]] = {n: [] for n in steps}
    parts: dict[str, list[float]] = collections.defaultdict(list)
    with instrumented(collections.Counter()) as acc:
        for _ in range(3):
            for n in steps:
                steps[n]()
        for r in range(args.steps):
            for n in (("residual", "mhc") if r % 2 == 0 else ("mhc", "residual")):
                acc.clear()
                t = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t)
                if n == "mhc":
                    kernels = sum(v for k, v in acc.items() if k.startswith("kernel "))
                    for k, v in [*acc.items(), ("all kernels", kernels)]:
                        parts[k].append(v)
    res, mhc = statistics.median(times["residual"]), statistics.median(times["mhc"])
    print(f"{args.preset}: residual {1e3 * res:.2f} ms/step, mHC {1e3 * mhc:.2f} ms/step "
          f"(ratio of medians {res / mhc:.3f}), {sublayers} sublayers")
    for k in sorted(parts, key=lambda k: -statistics.median(parts[k])):
        med = statistics.median(parts[k])
        print(f"  {k:42s} {1e3 * med:7.2f} ms/step {1e6 * med / sublayers:8.1f} us/sublayer")
    kernels = statistics.median(parts["all kernels"])
    around = statistics.median(  # split and finish hold the forward Functions; the backward ones are apart
        [a + b + c + d - k for a, b, c, d, k in zip(*(parts[key] for key in (
            "split (read, incl. its Function)", "finish (write-back, incl. its Function)",
            "CoeffsCarryFunction.backward", "PostCarryFunction.backward", "all kernels")))])
    extra = max(mhc - res, 1e-9)
    print(f"  Python around the kernels (split, finish, the backward Functions): {1e3 * around:.2f} ms/step")
    print(f"  of mHC's extra time over the residual ({1e3 * extra:.2f} ms): kernels {100 * kernels / extra:.0f} %, "
          f"Python around them {100 * around / extra:.0f} %, the rest (autograd engine, optimizer, the branch's "
          f"own ops running slower) {100 * (extra - kernels - around) / extra:.0f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
