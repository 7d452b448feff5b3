"""Inside a CPU training step: how long mHC's compiled kernels and the Python around them take.

    python -m benchmarks.step_timers [--preset default] [--variant mhc] [--steps 30]

Steps a residual and an mHC GPT (or another variant of ``bench_model``: ``hc``, ``mhc-lite``, ...)
alternately (as ``bench_model``) and times, per step of the variant, every compiled-kernel call
(``mhckit.ops.cpu``), every forward / backward of the sublayer's autograd Functions
(``mhckit.ops.carry``; these include the kernel calls) and ``HyperConnection.split`` with its
write-back (which include the forward Functions). Prints medians per step and per sublayer, and how
the variant's extra time over the residual splits into kernels, the Python around them and the rest.
It times the pair's Python autograd Functions (``mhckit.ops.carry``): the C++ pair, which mhckit runs
instead where it builds (``mhckit/ops/cpu/_pair.py``), calls the kernels from C++, out of the timers'
reach; ``bench_overhead`` splits that one's step. The timers themselves add a few
microseconds per call and inflate the Python part (a sampling profiler, py-spy, puts ~1 ms per mHC step
there where this reports ~3 ms; see the README). The kernels' time outside a training step (data in cache) is the C harness's
business: see the README's Speed section.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch

from benchmarks.bench_model import PRESETS, VARIANTS, _ops_of, build, step_fn
from mhckit import modules
from mhckit.ops import carry, cpu
from mhckit.ops.cpu import _pair
from mhckit.train.alloc import keep_freed_memory


# the sublayer's autograd Functions on the CPU kernels (mHC / mHC-lite, HC dynamic, HC static, the write-back)
_FUNCTIONS = (carry.CoeffsCarryFunction, carry.HCCarryFunction, carry.ReadCarryFunction, carry.PostCarryFunction)
_SPLIT, _FINISH = "split (read, incl. its Function)", "finish (write-back, incl. its Function)"
_AROUND = "Python around the kernels (split, finish, the backward Functions)"


@contextlib.contextmanager
def instrumented(acc: collections.Counter):
    """Inside the block, the kernel calls, the carry Functions and ``HyperConnection.split`` add their
    wall time to ``acc``; the originals are back afterwards."""
    saved = [(cpu, "_call", cpu._call), (modules.HyperConnection, "split", modules.HyperConnection.split),
             (_pair, "_ON", _pair._ON)]
    saved += [(cls, m, cls.__dict__[m]) for cls in _FUNCTIONS for m in ("forward", "backward")]
    try:
        _pair._ON = [False]  # the Python pair: its Functions and kernel calls are what the timers wrap
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
    for cls in _FUNCTIONS:
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
        acc[_SPLIT] += time.perf_counter() - t

        def timed_finish(y):
            t = time.perf_counter()
            out = finish(y)
            acc[_FINISH] += time.perf_counter() - t
            return out

        return u, timed_finish

    modules.HyperConnection.split = timed_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--variant", default="mhc", help="a bench_model variant run on the CPU kernels (default: mhc)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    if args.variant not in VARIANTS or args.variant == "residual":
        raise SystemExit(f"--variant: got {args.variant!r}; expected one of " + ", ".join(
            v for v in VARIANTS if v != "residual"))
    if not cpu.status()["active"]:
        raise SystemExit(f"the compiled CPU kernels are not active: {cpu.status()['why']}")
    print("heap:", keep_freed_memory())  # as the trainer and bench_model
    preset = PRESETS[args.preset]
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq_len"] + 1))
    name = args.variant
    runs = {n: build(preset, VARIANTS[n], "cpu", "auto") for n in ("residual", name)}
    steps = {n: step_fn(m, o, tokens, "cpu", **_ops_of(VARIANTS[n])) for n, (m, o) in runs.items()}
    sublayers = sum(1 for m in runs[name][0].modules() if isinstance(m, modules.HyperConnection))
    times: dict[str, list[float]] = {n: [] for n in steps}
    parts: dict[str, list[float]] = collections.defaultdict(list)
    with instrumented(collections.Counter()) as acc:
        for _ in range(3):
            for n in steps:
                steps[n]()
        for r in range(args.steps):
            for n in (("residual", name) if r % 2 == 0 else (name, "residual")):
                acc.clear()
                t = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t)
                if n == name:
                    kernels = sum(v for k, v in acc.items() if k.startswith("kernel "))
                    # split and finish hold the forward Functions; the backward ones are apart
                    around = acc[_SPLIT] + acc[_FINISH] + sum(v for k, v in acc.items() if k.endswith(".backward"))
                    for k, v in [*acc.items(), ("all kernels", kernels), (_AROUND, around - kernels)]:
                        parts[k].append(v)
    res, var = statistics.median(times["residual"]), statistics.median(times[name])
    print(f"{args.preset}: residual {1e3 * res:.2f} ms/step, {name} {1e3 * var:.2f} ms/step "
          f"(ratio of medians {res / var:.3f}), {sublayers} sublayers")
    for k in sorted((k for k in parts if k != _AROUND), key=lambda k: -statistics.median(parts[k])):
        med = statistics.median(parts[k])
        print(f"  {k:42s} {1e3 * med:7.2f} ms/step {1e6 * med / sublayers:8.1f} us/sublayer")
    kernels, around = statistics.median(parts["all kernels"]), statistics.median(parts[_AROUND])
    extra = max(var - res, 1e-9)
    print(f"  {_AROUND}: {1e3 * around:.2f} ms/step")
    print(f"  of {name}'s extra time over the residual ({1e3 * extra:.2f} ms): kernels {100 * kernels / extra:.0f} %, "
          f"Python around them {100 * around / extra:.0f} %, the rest (autograd engine, optimizer, the branch's "
          f"own ops running slower) {100 * (extra - kernels - around) / extra:.0f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
