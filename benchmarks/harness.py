"""One benchmark harness: interleaved runs (A B A B ...) in one process, medians and paired ratios.

Every benchmark describes its cases as zero-argument callables that run one iteration (e.g.
forward + backward of one layer). :func:`compare` warms each case up, then runs rounds in which
every case runs once, in a rotating order, so that slow drift of the machine (thermal, other
load) hits all cases alike; it reports each case's median time and the median over rounds of
its time divided by the baseline's time in the same round (the paired ratio).
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Result:
    case: str
    median_ms: float
    ratio: float  # median of per-round ratios to the baseline
    ratio_iqr: tuple[float, float]
    rounds: int
    params: dict = field(default_factory=dict)


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values`` (independent draws): the
    order statistics ``x_(l)`` and ``x_(n-1-l)`` (0-based, sorted) for the largest ``l`` with
    ``P(Binomial(n, 1/2) <= l) <= (1 - level) / 2``; the interval then misses the median with
    probability at most ``1 - level``. (min, max) when no ``l`` qualifies (``n < 6`` at 95 %)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("values: got none; expected at least one")
    if not 0 < level < 1:
        raise ValueError(f"level: got {level}; expected 0 < level < 1")
    tail, cdf, l = (1 - level) / 2, 0.0, -1
    for k in range(n):
        cdf += math.comb(n, k) / 2**n  # P(B <= k)
        if cdf > tail:
            break
        l = k
    return (xs[0], xs[-1]) if l < 0 else (xs[l], xs[n - 1 - l])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(
    cases: dict[str, Callable[[], object]],
    baseline: str,
    *,
    rounds: int = 15,
    warmup: int = 3,
    inner: int = 1,
    device: str = "cpu",
    params: dict | None = None,
) -> list[Result]:
    """Time every case interleaved; ratios are against ``cases[baseline]`` in the same round."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                cases[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    out = []
    for name in names:
        ratios = sorted(t / b for t, b in zip(times[name], times[baseline]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else (ratios[0], ratios[-1])
        out.append(Result(name, 1e3 * statistics.median(times[name]), statistics.median(ratios), (q[0], q[-1]),
                          rounds, dict(params or {})))
    return out


def command_line(module: str | None, argv: list[str] | None = None) -> str:
    """The command that ran a benchmark, as one would type it again from the repository root:
    ``python -m <module> <argv>`` (``module``: the benchmark's ``__spec__.name``; None when it ran as a
    script, whose path ``sys.argv[0]`` then stands first). ``argv``: its arguments (None: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    head = ["python", "-m", module] if module else ["python", sys.argv[0]]
    return shlex.join(head + args)


def write_results(results: list[Result], path_stem: Path, meta: dict, command: str) -> None:
    """``<stem>.csv`` (one row per case) and ``<stem>.md`` (a table with the run's metadata, which starts
    with ``command``, the one that produced it: :func:`command_line`)."""
    meta = {"command": command, **meta}
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in results for k in r.params})
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "case", "median_ms", "ratio_vs_baseline", "ratio_q1", "ratio_q3", "rounds", *meta])
        for r in results:
            w.writerow([*(r.params.get(k, "") for k in keys), r.case, f"{r.median_ms:.4f}", f"{r.ratio:.4f}",
                        f"{r.ratio_iqr[0]:.4f}", f"{r.ratio_iqr[1]:.4f}", r.rounds, *meta.values()])
    lines = [f"# {path_stem.name}", "", "```", json.dumps(meta, indent=1), "```", "",
             "| " + " | ".join([*keys, "case", "median ms", "ratio (median, IQR)"]) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for r in results:
        cells = [*(str(r.params.get(k, "")) for k in keys), r.case, f"{r.median_ms:.3f}",
                 f"{r.ratio:.3f} ({r.ratio_iqr[0]:.2f}-{r.ratio_iqr[1]:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    path_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def save_results(results: list[Result], stem: Path, command: str, note: str = "", **meta) -> None:
    """:func:`write_results` with the run's info (commit, versions, hardware, threads) and ``meta``, then
    says where the files went (and ``note``)."""
    from mhckit.train.runinfo import run_info

    write_results(results, stem, dict(run_info(), threads=torch.get_num_threads(), **meta), command=command)
    print(f"wrote {stem}.csv and {stem}.md{note}")
