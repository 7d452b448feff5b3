"""The report of ``mhckit compare``: results table, figures and a reading generated from the numbers.

:func:`write_report` reads a compare directory (``compare.json`` plus one run directory per
variant x seed, each with ``summary.json``, ``metrics.jsonl`` and ``compare_run.json``) and writes
``report.md`` and the PNG figures next to it. It can be re-run on its own: everything it needs is
on disk.

A run that diverged (stopped by the trainer after ``max_bad_steps`` non-finite steps in a row; its
directory has ``diverged.json`` instead of ``summary.json``) is reported as such: the table says
at which step, the loss statistics of its variant leave it out (and say how many seeds did), the
reading names it, and the figures draw its curves up to the divergence as a separate line. Its
diagnostics still count for the largest composite gain (a blow-up before a divergence is the point).

Definitions used in the table (one row per variant, statistics over seeds):

* final validation loss: mean, standard deviation and min-max over the seeds that finished (not
  the diverged ones); delta = mean minus the residual mean.
* tokens/s: median, over the logged training steps after the first ``SKIP_STEPS`` steps and over
  all seeds, of one training step's throughput (``batch x seq_len / step time``).
* memory: ``torch.cuda.max_memory_allocated`` during training on CUDA; on CPU the estimate of
  :mod:`mhckit.train.memory` (params+grads+Adam+saved activations), labelled as such.
* max composite gain: the largest forward (max |row sum|) and backward (max |column sum|) Amax gain
  of any prefix ``H_l...H_1`` or suffix ``H_L...H_l`` composite of the token-averaged ``h_res``,
  over every diagnostics step and seed (mHC paper Fig. 3 / 7).
* stream cosine: mean pairwise cosine between the streams entering the final collapse, at the last
  diagnostics step (1 = the n streams carry one signal).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plots
from .memory import format_bytes

SKIP_STEPS = 5  # throughput ignores the first steps (allocator and cache warm-up)
BASELINE = "residual"
BLOWUP = 100.0  # a composite gain above this (or non-finite) is called a blow-up in the text
DRIFT = 2.0  # between DRIFT and BLOWUP the text calls it amplification without a blow-up
MHC_BOUND = 2.0  # the stress preset's requirement: mHC's composite gain stays at most 2

FIGURES = {
    "val_loss": "val_loss.png",
    "grad_norm": "grad_norm.png",
    "gain_depth": "gain_vs_depth.png",
    "gain_step": "max_gain_vs_step.png",
    "heatmaps": "h_res_heatmaps.png",
}


# --------------------------------------------------------------------------- loading


@dataclass
class RunResult:
    """One variant x seed run, as found on disk."""

    variant: str
    seed: int
    path: Path
    summary: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    diags: list[dict[str, Any]]
    extra: dict[str, Any]  # compare_run.json: wall_s, memory, cuda_peak_bytes
    diverged: dict[str, Any] | None = None  # diverged.json (step, last_good_checkpoint, error); None: finished

    @property
    def final_diag(self) -> dict[str, Any] | None:
        return self.diags[-1] if self.diags else None

    @property
    def finished(self) -> bool:
        return self.diverged is None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path, variant: str, seed: int) -> RunResult:
    """A finished run (``summary.json``) or a diverged one (``diverged.json``: its summary has no
    ``val_loss``, its metrics stop at the divergence)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    diverged = None
    if not (run_dir / "summary.json").exists() and (run_dir / "diverged.json").exists():
        diverged = json.loads((run_dir / "diverged.json").read_text())
        summary = {"name": run_dir.name, "variant": variant, "seed": seed, "val_loss": None,
                   "params": diverged.get("params")}
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
    extra_path = run_dir / "compare_run.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    by_kind = {k: [r for r in records if r.get("kind") == k] for k in ("train", "eval", "diag")}
    return RunResult(variant, seed, run_dir, summary, by_kind["train"], by_kind["eval"], by_kind["diag"], extra,
                     diverged)


# --------------------------------------------------------------------------- statistics


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _max(values: list[float]) -> float:
    """Max that propagates non-finite values (a NaN / inf gain is a blow-up, not a gap)."""
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def throughput(run: RunResult, skip: int = SKIP_STEPS) -> list[float]:
    vals = [_num(r.get("tokens_per_s")) for r in run.train if r["step"] > skip]
    if not vals:
        vals = [_num(r.get("tokens_per_s")) for r in run.train]
    return _finite(vals)


def max_spike(run: RunResult, after: int) -> float:
    vals = [_num(r.get("spike_ratio")) for r in run.train if r["step"] > after]
    return _max(vals) if vals else math.nan


def hres_movement(run: RunResult) -> tuple[float, float] | None:
    """``(mean |h_res(last) - h_res(first)| per entry, mean diagonal at the last step)`` over sublayers,
    between the first and last diagnostics steps; None without ``h_res`` or with one diag step."""
    if len(run.diags) < 2:
        return None
    moved, diag = [], []
    for a, b in zip(run.diags[0]["sublayers"], run.diags[-1]["sublayers"]):
        if a.get("h_res_mean") is None or b.get("h_res_mean") is None:
            continue
        n = len(b["h_res_mean"])
        moved.append(statistics.fmean(abs(_num(b["h_res_mean"][i][j]) - _num(a["h_res_mean"][i][j]))
                                      for i in range(n) for j in range(n)))
        diag.append(statistics.fmean(_num(b["h_res_mean"][i][i]) for i in range(n)))
    if not moved:
        return None
    return statistics.fmean(moved), statistics.fmean(diag)


@dataclass
class VariantStats:
    variant: str
    runs: list[RunResult]
    losses: list[float] = field(default_factory=list)
    loss_mean: float = math.nan
    loss_std: float = math.nan
    loss_min: float = math.nan
    loss_max: float = math.nan
    tokens_per_s: float = math.nan
    params: int | None = None
    memory_bytes: float | None = None
    memory_kind: str = "estimate"  # "cuda_peak" or "estimate"
    memory_parts: dict[str, float] = field(default_factory=dict)
    max_fwd_gain: float | None = None  # None: the variant has no h_res
    max_bwd_gain: float | None = None
    max_fwd_step: int | None = None
    final_fwd_gain: float | None = None
    final_bwd_gain: float | None = None
    max_abs_log_colsum: float | None = None
    stream_cosine: float | None = None
    spike: float = math.nan
    wall_s: float | None = None
    hres_move: float | None = None  # mean |h_res(last diag) - h_res(first diag)| per entry
    hres_diag: float | None = None  # mean diagonal of h_res at the last diag step
    diag_steps: tuple[int, int] | None = None

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.finished]

    @property
    def diverged(self) -> list[RunResult]:
        return [r for r in self.runs if not r.finished]

    @property
    def ends(self) -> list[RunResult]:
        """The runs whose last diagnostics are "the final step": the finished ones, or (every seed
        diverged) the diverged ones, at their last diagnostics before the divergence."""
        return self.finished or self.runs


def variant_stats(variant: str, runs: list[RunResult], warmup_steps: int = 0) -> VariantStats:
    s = VariantStats(variant, runs)
    s.losses = [_num(r.summary.get("val_loss")) for r in s.finished]  # a diverged run has no final loss
    fin = _finite(s.losses)
    if len(fin) == len(s.losses) and fin:
        s.loss_mean = statistics.fmean(fin)
        s.loss_std = statistics.stdev(fin) if len(fin) > 1 else 0.0
        s.loss_min, s.loss_max = min(fin), max(fin)
    tps = [v for r in runs for v in throughput(r)]
    s.tokens_per_s = statistics.median(tps) if tps else math.nan
    s.params = next((r.summary["params"] for r in runs if r.summary.get("params")), None)
    peaks = [r.extra.get("cuda_peak_bytes") for r in runs]
    if peaks and all(isinstance(p, (int, float)) for p in peaks):
        s.memory_kind, s.memory_bytes = "cuda_peak", float(max(peaks))
    else:
        mems = [r.extra.get("memory") for r in runs if r.extra.get("memory")]
        if mems:
            s.memory_kind = "estimate"
            s.memory_bytes = float(max(m["total_bytes"] for m in mems))
            s.memory_parts = {k: float(max(m[k] for m in mems)) for k in
                              ("param_bytes", "grad_bytes", "adam_bytes", "activation_bytes")}
    diags = [d for r in runs for d in r.diags if d.get("max_forward_gain") is not None]
    if diags:
        s.max_fwd_gain = _max([_num(d["max_forward_gain"]) for d in diags])
        s.max_bwd_gain = _max([_num(d["max_backward_gain"]) for d in diags])
        finite = [d for d in diags if math.isfinite(_num(d["max_forward_gain"]))]
        if finite:
            s.max_fwd_step = max(finite, key=lambda d: d["max_forward_gain"])["step"]
        finals = [r.final_diag for r in s.ends if r.final_diag and r.final_diag.get("max_forward_gain") is not None]
        s.final_fwd_gain = _max([_num(d["max_forward_gain"]) for d in finals])
        s.final_bwd_gain = _max([_num(d["max_backward_gain"]) for d in finals])
        logs = [_num(v) for d in diags for v in d.get("max_abs_log_colsum", []) + d.get("suffix_max_abs_log_colsum", [])]
        s.max_abs_log_colsum = _max(logs) if logs else None
    cos = [_num(r.final_diag.get("stream_cosine")) for r in s.ends if r.final_diag]
    if cos and variant != BASELINE:
        s.stream_cosine = statistics.fmean(cos) if all(map(math.isfinite, cos)) else math.nan
    moves = [(r, m) for r, m in ((r, hres_movement(r)) for r in s.ends) if m is not None]
    if moves:
        s.hres_move = statistics.fmean(m[0] for _, m in moves)
        s.hres_diag = statistics.fmean(m[1] for _, m in moves)
        s.diag_steps = (moves[0][0].diags[0]["step"], moves[0][0].diags[-1]["step"])
    s.spike = _max([max_spike(r, warmup_steps) for r in runs])
    walls = [r.extra.get("wall_s") for r in runs]
    s.wall_s = sum(walls) if walls and all(isinstance(w, (int, float)) for w in walls) else None
    return s


# --------------------------------------------------------------------------- formatting


def _f(v: float | None, fmt: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, fmt)


def fmt_gain(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return _f(v)
    if v < 10:
        return f"{v:.3f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.3e}"


def memory_label(stats: dict[str, VariantStats]) -> str:
    kinds = {s.memory_kind for s in stats.values() if s.memory_bytes is not None}
    if kinds == {"cuda_peak"}:
        return "peak memory (CUDA max allocated)"
    return "est. training memory*"


def _step(r: RunResult) -> str:
    """The step a diverged run stopped at (``?`` if its marker does not say)."""
    step = (r.diverged or {}).get("step")
    return "?" if step is None else str(step)


def _where(runs: list[RunResult], of: str = "") -> str:
    """``"seed 1 at step 40, seed 2 at step 38"`` for diverged runs."""
    return ", ".join(f"seed {r.seed} at step {_step(r)}{of}" for r in runs if r.diverged is not None)


def loss_cell(s: VariantStats) -> str:
    """The loss column: statistics over the finished seeds, and which seeds diverged at which step."""
    n, bad = len(s.runs), s.diverged
    if bad and len(bad) == n:
        return f"diverged on all {n} seed{'s' if n != 1 else ''} ({_where(bad)})"
    loss = f"{_f(s.loss_mean)} ± {_f(s.loss_std)} [{_f(s.loss_min)}, {_f(s.loss_max)}]"
    if not math.isfinite(s.loss_mean):
        loss = "diverged (" + ", ".join(_f(x) for x in s.losses) + ")"
    if bad:
        loss += f"; {len(bad)} of {n} seeds diverged ({_where(bad)}), left out"
    return loss


def results_table(stats: dict[str, VariantStats]) -> str:
    """The markdown results table (one row per variant)."""
    base = stats.get(BASELINE)
    n_seeds = max(len(s.runs) for s in stats.values())
    head = [
        "variant", f"final val loss (mean ± std, [min, max], {n_seeds} seed{'s' if n_seeds != 1 else ''})",
        "Δ vs residual", "tokens/s", "× residual", "params", memory_label(stats),
        "max fwd gain", "max bwd gain", "final stream cos",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v, s in stats.items():
        loss = loss_cell(s)
        no_delta = base is None or v == BASELINE or not (s.finished and base.finished)
        delta = "-" if no_delta else _f(s.loss_mean - base.loss_mean, "+.4f")
        ratio = "-" if base is None else _f(s.tokens_per_s / base.tokens_per_s, ".2f")
        row = [v, loss, delta, _f(s.tokens_per_s, ",.0f"), ratio, f"{s.params:,}" if s.params else "-",
               format_bytes(s.memory_bytes), fmt_gain(s.max_fwd_gain), fmt_gain(s.max_bwd_gain),
               _f(s.stream_cosine, ".3f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the reading


def _compare_losses(a: VariantStats, b: VariantStats) -> str:
    """One sentence: ``a`` against ``b`` by final validation loss, judged against the seed spread
    (over the seeds that finished; a note names the diverged seeds left out)."""
    left_out = [f"{s.variant} {len(s.diverged)} of {len(s.runs)}" for s in (a, b) if s.diverged and s.finished]
    note = f" (Over the seeds that finished; diverged and left out: {', '.join(left_out)}.)" if left_out else ""
    return _compare_finished(a, b) + note


def _compare_finished(a: VariantStats, b: VariantStats) -> str:
    if not (math.isfinite(a.loss_mean) and math.isfinite(b.loss_mean)):
        bad = [f"{s.variant} diverged on every seed" if not s.finished else
               f"{s.variant} ended with a non-finite validation loss" for s in (a, b) if not math.isfinite(s.loss_mean)]
        return f"{a.variant} vs {b.variant}: not comparable, {' and '.join(bad)}."
    d = a.loss_mean - b.loss_mean
    word = "lower" if d < 0 else "higher"
    n = min(len(a.finished), len(b.finished))
    if abs(d) < 5e-5:
        return (f"{a.variant}'s mean final validation loss equals {b.variant}'s to 4 decimals "
                f"({a.loss_mean:.4f} vs {b.loss_mean:.4f}): no difference.")
    if n < 2:
        return (f"{a.variant}'s final validation loss is {abs(d):.4f} {word} than {b.variant}'s "
                f"({a.loss_mean:.4f} vs {b.loss_mean:.4f}); with one seed there is no spread to judge it against, "
                "so this is not evidence of a difference.")
    paired = _paired(a, b)
    if a.loss_max < b.loss_min or a.loss_min > b.loss_max:
        every = "below" if d < 0 else "above"
        return (f"{a.variant}'s mean final validation loss is {abs(d):.4f} {word} than {b.variant}'s "
                f"({a.loss_mean:.4f} vs {b.loss_mean:.4f}) and every {a.variant} seed ends {every} every "
                f"{b.variant} seed: a difference beyond the seed spread (only {n} seeds, so weak evidence){paired}.")
    return (f"{a.variant}'s mean final validation loss is {abs(d):.4f} {word} than {b.variant}'s "
            f"({a.loss_mean:.4f} vs {b.loss_mean:.4f}), but the seed ranges overlap "
            f"([{a.loss_min:.4f}, {a.loss_max:.4f}] vs [{b.loss_min:.4f}, {b.loss_max:.4f}]): "
            f"no difference can be claimed at this budget{paired}.")


def _paired(a: VariantStats, b: VariantStats) -> str:
    """``"; paired by seed (same batches): -0.01, +0.02"`` - the same seed sees the same data order."""
    la = {r.seed: _num(r.summary.get("val_loss")) for r in a.finished}
    lb = {r.seed: _num(r.summary.get("val_loss")) for r in b.finished}
    diffs = [la[s] - lb[s] for s in sorted(set(la) & set(lb))]
    if len(diffs) < 2 or not all(map(math.isfinite, diffs)):
        return ""
    signs = {d > 0 for d in diffs}
    verdict = (f"{a.variant} {'higher' if True in signs else 'lower'} on every seed" if len(signs) == 1
               else "mixed signs")
    return "; paired by seed (same batches): " + ", ".join(f"{x:+.4f}" for x in diffs) + f" ({verdict})"


def divergence_sentences(stats: dict[str, VariantStats]) -> list[str]:
    """One sentence per variant with diverged seeds: which, at which step, what that leaves out."""
    out = []
    for v, s in stats.items():
        bad = s.diverged
        if not bad:
            continue
        n = len(s.runs)
        steps = {r.diverged.get("steps") for r in bad} - {None}
        of = f" of {steps.pop()}" if len(steps) == 1 else ""
        lead = (f"**{v} diverged** on {len(bad)} of {n} seeds ({_where(bad, of)}): the trainer stopped it after "
                "max_bad_steps steps in a row with a non-finite loss or gradient norm (its last good checkpoint "
                "is kept)")
        k = len(s.finished)
        losses = (f"its loss statistics cover the {k} seed{'s' if k != 1 else ''} that finished" if k else
                  "it has no final validation loss, so its loss is not compared")
        gains = ("" if s.max_fwd_gain is None else
                 "; its diagnostics up to the divergence still count for the composite gain")
        out.append(f"{lead}. {losses[0].upper()}{losses[1:]}{gains}.")
    return out


def gain_sentences(stats: dict[str, VariantStats]) -> list[str]:
    """Max composite gain of every variant with ``h_res``; HC's blow-up (or not); mHC's bound."""
    out = []
    gained = {v: s for v, s in stats.items() if s.max_fwd_gain is not None}
    for v, s in gained.items():
        out.append(f"**max composite gain** ({v}): forward {fmt_gain(s.max_fwd_gain)}, backward "
                   f"{fmt_gain(s.max_bwd_gain)} (largest over all diagnostics steps, seeds, prefix and suffix "
                   f"composites; at the final step: forward {fmt_gain(s.final_fwd_gain)}, backward "
                   f"{fmt_gain(s.final_bwd_gain)}; largest |log column sum| {fmt_gain(s.max_abs_log_colsum)}).")
    hc, mhc = gained.get("hc"), gained.get("mhc")
    if hc is not None:
        g = _max([hc.max_fwd_gain, hc.max_bwd_gain])
        if not math.isfinite(g):
            out.append("HC's composite mapping became non-finite: the unconstrained h_res blew up.")
        elif g > BLOWUP:
            out.append(f"HC's composite gain blew up to {fmt_gain(g)} (above {BLOWUP:g}; the forward gain was largest "
                       f"at step {hc.max_fwd_step}): the unconstrained h_res amplifies the signal through depth, the "
                       "instability the mHC paper reports (~3000 for HC at 27B).")
        elif g > DRIFT:
            out.append(f"HC's composite gain grew to {fmt_gain(g)} (largest forward gain at step {hc.max_fwd_step}): "
                       "the unconstrained h_res amplifies the signal through depth, but HC did not blow up "
                       f"(a blow-up is counted here above {BLOWUP:g}; the mHC paper reports ~3000 for HC at 27B).")
        else:
            out.append(f"HC did not blow up in this run: its largest composite gain was {fmt_gain(g)} "
                       f"(at most {DRIFT:g}) at this size and budget; the mHC paper reports ~3000 for HC at 27B.")
        if hc.diverged:
            blew = not math.isfinite(g) or g > BLOWUP
            out[-1] += (f" HC's training diverged on {len(hc.diverged)} of {len(hc.runs)} seeds; " +
                        ("its gain blow-up is counted above, diagnostics up to the divergence included." if blew else
                         "the diagnostics logged before the divergence (counted above) show no gain blow-up."))
    if mhc is not None:
        g = _max([mhc.max_fwd_gain, mhc.max_bwd_gain])
        ok = math.isfinite(g) and g <= MHC_BOUND
        out.append(f"mHC's largest composite gain is {fmt_gain(g)}: " +
                   (f"it stays at most {MHC_BOUND:g}, as doubly stochastic products should (the backward side "
                    "carries the Sinkhorn truncation error)." if ok else
                    f"ABOVE {MHC_BOUND:g}, which a doubly stochastic composite should not reach; investigate."))
    base = stats.get(BASELINE)
    if hc is not None and base is not None:
        g = _max([hc.max_fwd_gain, hc.max_bwd_gain])
        if (not math.isfinite(g) or g > BLOWUP) and math.isfinite(hc.loss_mean) and math.isfinite(base.loss_mean):
            worse = hc.loss_min > base.loss_max
            out.append(f"HC's validation loss is {'' if worse else 'not '}worse than residual's "
                       f"beyond the seed spread ({hc.loss_mean:.4f} vs {base.loss_mean:.4f}; largest train-loss spike "
                       f"ratio hc {_f(hc.spike, '.2f')} vs residual {_f(base.spike, '.2f')}): at this size and budget the "
                       "gain blow-up " + ("shows" if worse else "does not show") + " in the loss.")
    if hc is not None and mhc is not None:
        gh, gm = _max([hc.max_fwd_gain, hc.max_bwd_gain]), _max([mhc.max_fwd_gain, mhc.max_bwd_gain])
        if math.isfinite(gh) and math.isfinite(gm) and gm > 0:
            out.append(f"HC's largest gain is {gh / gm:.3g}x mHC's.")
    return out


def reading(stats: dict[str, VariantStats]) -> list[str]:
    """Short statements generated from the numbers; nothing that they do not support."""
    out = divergence_sentences(stats)
    base = stats.get(BASELINE)
    others = [s for v, s in stats.items() if v != BASELINE]
    if base is not None:
        out += [_compare_losses(s, base) for s in others]
    if "mhc" in stats and "hc" in stats:
        out.append(_compare_losses(stats["mhc"], stats["hc"]))
    out += gain_sentences(stats)
    if base is not None and math.isfinite(base.tokens_per_s):
        parts = [f"{s.variant} {s.tokens_per_s / base.tokens_per_s:.2f}x" for s in others if math.isfinite(s.tokens_per_s)]
        if parts:
            out.append("Throughput relative to residual on this hardware: " + ", ".join(parts) +
                       " (runs timed one after another, so the machine's load moves these; `python -m "
                       "benchmarks.bench_model` times them interleaved. The paper reports 6.7% extra training time at "
                       "n = 4 with its fused GPU kernels at 27B.)")
        if base.memory_bytes:
            parts = [f"{s.variant} {s.memory_bytes / base.memory_bytes:.2f}x" for s in others if s.memory_bytes]
            if parts:
                what = "peak memory" if base.memory_kind == "cuda_peak" else "estimated training memory"
                out.append(f"{what.capitalize()} relative to residual: " + ", ".join(parts) +
                           " (the n streams multiply the residual-stream activations).")
    moved = {v: s for v, s in stats.items() if s.hres_move is not None}
    if moved:
        first, last = next(iter(moved.values())).diag_steps
        out.append(f"How much h_res moved between the diagnostics at step {first} and step {last} (mean |change| "
                   "per entry, over sublayers and seeds), and its final mean diagonal: " +
                   ", ".join(f"{v} {_f(s.hres_move, '.3g')} (diagonal {_f(s.hres_diag, '.3f')})" for v, s in moved.items())
                   + ".")
    cos = {v: s.stream_cosine for v, s in stats.items() if s.stream_cosine is not None}
    if cos:
        out.append("Final stream cosine (1 = the streams carry one signal): " +
                   ", ".join(f"{v} {_f(c, '.3f')}" for v, c in cos.items()) + ".")
    spikes = {v: s.spike for v, s in stats.items() if math.isfinite(s.spike)}
    if spikes:
        out.append("Largest train-loss spike after warmup (loss / its running mean): " +
                   ", ".join(f"{v} {x:.2f}" for v, x in spikes.items()) + ".")
    return out


# --------------------------------------------------------------------------- figures


def _curves(stats: dict[str, VariantStats], points) -> dict[str, list[list[tuple[int, float]]]]:
    """``points(run)`` of each variant's finished runs under its name, and of its diverged runs (up to
    the divergence) under ``"<variant>, diverged"``: a band is drawn over the steps every run of a
    line logged, so a run that stopped early must not cut its variant's line short."""
    curves = {}
    for v, s in stats.items():
        for key, runs in ((v, s.finished), (f"{v}, diverged", s.diverged)):
            if runs:
                curves[key] = [points(run) for run in runs]
    return curves


def make_figures(stats: dict[str, VariantStats], out: Path) -> dict[str, Path]:
    out = Path(out)
    figs: dict[str, Path] = {}
    curves = _curves(stats, lambda run: [(r["step"], _num(r["val_loss"])) for r in run.evals])
    figs["val_loss"] = plots.plot_curves(curves, out / FIGURES["val_loss"], title="validation loss (mean, min-max over seeds)",
                                         ylabel="val loss (nats/token)")
    curves = _curves(stats, lambda run: [(r["step"], _num(r["grad_norm"])) for r in run.train])
    figs["grad_norm"] = plots.plot_curves(curves, out / FIGURES["grad_norm"],
                                          title="gradient norm before clipping (mean, min-max over seeds)",
                                          ylabel="grad norm", logy=True)
    gained = {v: s for v, s in stats.items() if s.max_fwd_gain is not None}
    if gained:
        finals = {v: [r.final_diag for r in s.ends if r.final_diag] for v, s in gained.items()}
        step = max((d["step"] for ds in finals.values() for d in ds), default=0)
        figs["gain_depth"] = plots.plot_gain_vs_depth(
            finals, out / FIGURES["gain_depth"],
            title=f"composite gain against depth at step {step} (first seed bold)")
        series = {v: [r.diags for r in s.runs] for v, s in gained.items()}
        figs["gain_step"] = plots.plot_max_gain_vs_step(series, out / FIGURES["gain_step"],
                                                        title="largest composite gain during training")
        pick = [v for v in ("hc", "mhc") if v in gained] or list(gained)
        heat = {v: gained[v].ends[0].final_diag for v in pick if gained[v].ends[0].final_diag}
        if heat:
            seed = gained[pick[0]].ends[0].seed
            figs["heatmaps"] = plots.plot_heatmaps(heat, out / FIGURES["heatmaps"],
                                                   title=f"token-averaged h_res (seed {seed}, final step)")
    return figs


# --------------------------------------------------------------------------- the report


def collect_stats(compare_dir: Path, meta: dict[str, Any]) -> dict[str, VariantStats]:
    warmup = int(meta.get("config", {}).get("warmup_steps", 0))
    stats = {}
    for v in meta["variants"]:
        runs = [load_run(Path(compare_dir) / run_name(v, s), v, s) for s in meta["seeds"]]
        stats[v] = variant_stats(v, runs, warmup)
    return stats


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def _setup_lines(meta: dict[str, Any], stats: dict[str, VariantStats]) -> list[str]:
    cfg = meta["config"]
    m, hc = cfg["model"], cfg["model"]["hc"]
    data, info = meta.get("data", {}), meta.get("run_info", {})
    tokens_per_run = cfg["steps"] * cfg["batch_size"] * m["seq_len"]
    params = ", ".join(f"{v} {s.params:,}" for v, s in stats.items() if s.params)
    seeds = meta["seeds"]
    lines = [
        f"- **preset**: `{meta.get('preset')}`" + (f", overrides: `{' '.join(meta['overrides'])}`" if meta.get("overrides") else ""),
        f"- **model**: GPT, {m['n_layer']} blocks ({2 * m['n_layer']} hyper-connection sublayers), d_model {m['d_model']}, "
        f"{m['n_head']} heads, seq_len {m['seq_len']}, vocab {m['vocab_size']}, n_streams {hc['n_streams']} "
        f"(init `{hc['init']}`, Sinkhorn iters {hc['sinkhorn_iters']}, stream collapse `{m['reduce']}`); params: {params}",
        f"- **training**: {cfg['steps']} steps, batch {cfg['batch_size']} x {m['seq_len']} tokens "
        f"({tokens_per_run:,} tokens per run), AdamW lr {cfg['lr']:g} ({cfg['schedule']}, warmup {cfg['warmup_steps']}), "
        f"weight decay {cfg['weight_decay']:g}, grad clip {cfg['grad_clip']:g}, precision {cfg['precision']}; "
        f"eval every {cfg['eval_every']} steps on {cfg['eval_batches']} fixed batches, diagnostics every {cfg['diag_every']}",
        f"- **seeds**: {len(seeds)} ({', '.join(map(str, seeds))}); every variant sees the same batches for a given seed",
        f"- **data**: {data.get('source', '?')} ({data.get('tokenizer', '?')} tokenizer): {data.get('num_tokens', 0):,} tokens, "
        f"{data.get('train_tokens', 0):,} train / {data.get('val_tokens', 0):,} validation",
        f"- **hardware**: {info.get('hardware', '?')}; torch {info.get('torch', '?')}, python {info.get('python', '?')}"
        + (f"; CPU kernels: {info['cpu_kernels']}" if info.get("cpu_kernels") else "") + f"; commit `{info.get('commit', '?')}`",
    ]
    wall = meta.get("wall_s")
    if wall is not None:
        trained = sum(1 for r in meta.get("runs", {}).values() if r.get("status") != "skipped")
        total = len(meta.get("runs", {}))
        diverged = sum(1 for r in meta.get("runs", {}).values() if r.get("status") == "diverged")
        lines.append(f"- **wall time**: {wall:.0f} s for the last invocation of `mhckit compare` (it trained {trained} "
                     f"of {total} runs{f', {diverged} of which diverged' if diverged else ''}; data loading, training, "
                     "evaluation, diagnostics and memory measurement, not the report itself)")
    loads = [r.extra.get("load_avg") for s in stats.values() for r in s.runs]
    loads = [x for x in loads if isinstance(x, (int, float))]
    cores = _cores(info.get("hardware", ""))
    if loads:
        busy = cores is not None and max(loads) > cores + 0.5
        lines.append(f"- **machine load** (1-min load average at the end of each run): {min(loads):.1f}-{max(loads):.1f}"
                     + (f" on {cores} cores: other processes shared the CPU, so tokens/s and times are inflated "
                        "and noisy" if busy else ""))
    walls = {v: s.wall_s for v, s in stats.items()}
    if walls and all(w is not None for w in walls.values()):
        lines.append(f"- **training time**, summed over runs as each was trained: {sum(walls.values()):.0f} s ("
                     + ", ".join(f"{v} {w:.0f} s" for v, w in walls.items()) + ")")
    return lines


def _cores(hardware: str) -> int | None:
    import re

    m = re.search(r"(\d+) cores", hardware)
    return int(m.group(1)) if m else None


def _diverged_lines(stats: dict[str, VariantStats], compare_dir: Path) -> list[str]:
    """A list of the diverged runs (step, last good checkpoint) under the table; empty if none."""
    bad = [r for s in stats.values() for r in s.diverged]
    if not bad:
        return []
    lines = ["**Diverged runs** (stopped after max_bad_steps non-finite steps in a row; `diverged.json` in the run "
             "directory; left out of the loss statistics, kept in the gain diagnostics; re-running `mhckit compare` "
             "skips them, deleting `diverged.json` retries from the last good checkpoint):", ""]
    for r in bad:
        d = r.diverged
        last = d.get("last_good_checkpoint")
        if last:
            with contextlib.suppress(ValueError):
                last = str(Path(last).relative_to(compare_dir))
            last = f"`{last}` (step {d.get('last_good_step')})"
        lines.append(f"- `{r.path.name}`: diverged at step {_step(r)} of {d.get('steps', '?')}; "
                     f"last good checkpoint {last or 'none (none was written before the divergence)'}")
    return lines + [""]


def write_report(compare_dir: Path) -> dict[str, Any]:
    """Write ``report.md`` and the figures into ``compare_dir``; returns the paths, table and reading."""
    compare_dir = Path(compare_dir)
    meta = json.loads((compare_dir / "compare.json").read_text())
    stats = collect_stats(compare_dir, meta)
    figs = make_figures(stats, compare_dir)
    table = results_table(stats)
    text = reading(stats)
    md = [f"# mhckit compare: {meta.get('name', compare_dir.name)}", "",
          "Residual vs hyper-connection GPTs trained with the same data order and budget "
          "(mHC: arXiv 2512.24880; HC: arXiv 2409.19606; mHC-lite: arXiv 2601.05732).", "", "## Setup", ""]
    md += _setup_lines(meta, stats)
    md += ["", "## Results", "", table, ""]
    md += _diverged_lines(stats, compare_dir)
    if memory_label(stats).endswith("*"):
        md.append("\\* estimated training memory (params+grads+Adam+saved activations): CPU has no allocator "
                  "statistic, so this counts parameter, gradient and AdamW-state bytes plus the exact bytes of the "
                  "tensors autograd saves for backward in one training forward (`mhckit/train/memory.py`; with "
                  "`compile=true`, of the compiled step); it is not a measured process peak.")
        md.append("")
    md.append("Tokens/s is the median one-step throughput after the first "
              f"{SKIP_STEPS} steps, pooled over seeds; on a shared CPU it is noisy. Gains: Amax of the composite of "
              "the token-averaged h_res, largest over depth (prefix and suffix), diagnostics steps and seeds; 1 is ideal.")
    md += ["", "## Reading", ""] + [f"- {line}" for line in text]
    md += ["", "## Figures", ""]
    captions = {
        "val_loss": "Validation loss (mean over seeds, band = min-max).",
        "gain_depth": "Forward / backward Amax gain of the prefix composite H_l...H_1 against depth, final step "
                      "(mHC paper Fig. 3 / 7 analogue).",
        "gain_step": "Largest composite gain at each diagnostics step.",
        "heatmaps": "Token-averaged h_res of the first, middle and last sublayers and the composite of all "
                    "sublayers (mHC paper Fig. 8 analogue).",
        "grad_norm": "Global gradient norm before clipping (mean over seeds, band = min-max).",
    }
    for key in ("val_loss", "gain_depth", "gain_step", "heatmaps", "grad_norm"):
        if key in figs:
            md += [f"![{key}]({figs[key].name})", "", captions[key], ""]
    path = compare_dir / "report.md"
    path.write_text("\n".join(md))
    return {"report": path, "figures": figs, "table": table, "reading": text, "stats": stats}
