"""Figures for ``mhckit compare`` and ``mhckit diagnose`` (matplotlib, Agg backend, small PNGs).

Every function takes plain data (lists of metric records, ``diag`` dicts from
:func:`mhckit.train.monitor.collect`) and writes one PNG at ``DPI`` dots per inch:

* :func:`plot_curves` - a metric against step, mean over seeds with a min-max band per variant
  (validation loss, gradient norm);
* :func:`plot_gain_vs_depth` - forward / backward Amax gain of the prefix composite
  ``H_l ... H_1`` against depth ``l`` (the mHC paper's Fig. 3 / Fig. 7 analogue);
* :func:`plot_max_gain_vs_step` - the largest composite gain of each diagnostics step;
* :func:`plot_heatmaps` - token-averaged ``h_res`` of the first, middle and last sublayer and of
  the composite of all of them, values annotated (the paper's Fig. 8 analogue).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
PALETTE = 128  # colours of the saved PNGs
COLORS = {"residual": "#444444", "hc": "#d62728", "mhc": "#1f77b4", "mhc-lite": "#2ca02c", "identity": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def color(variant: str) -> str:
    """The variant's colour; ``"<variant>, diverged"`` keeps its variant's colour (drawn dotted)."""
    return COLORS.get(variant.split(",")[0], "#ff7f0e")


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG with a 128-colour palette (a third of the RGBA size, no visible change)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    from PIL import Image  # a dependency of matplotlib

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return path


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return np.where(np.isfinite(a), a, np.nan)


def _positive(values: Sequence[float]) -> np.ndarray:
    """Values for a log axis: non-finite or non-positive ones become NaN (a gap in the line)."""
    a = _finite(values)
    return np.where(a > 0, a, np.nan)


def _log_axis(ax) -> None:
    """Log y with plain numbers as labels (a narrow range otherwise shows ``1.02 x 10^0``); minor
    ticks are labelled only when the axis spans less than a decade."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.4g}" if _narrow(ax) else ""))
    ax.tick_params(axis="y", which="minor", labelsize=6)


def _narrow(ax) -> bool:
    lo, hi = ax.get_ylim()  # read at draw time, after every line is in
    return lo > 0 and hi / lo < 10


def style(variant: str) -> str:
    """Line style: mhc-lite dashed, so it stays visible on top of mhc when both sit at exactly 1."""
    if variant.endswith(", diverged"):
        return ":"
    return "--" if variant == "mhc-lite" else "-"


def _any_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).any())


def band(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, mean, min, max)`` over seeds at the steps every seed logged (NaN-aware)."""
    common = sorted(set.intersection(*(set(s for s, _ in run) for run in series))) if series else []
    if not common:
        return (np.array([]),) * 4  # type: ignore[return-value]
    table = np.array([[dict(run)[s] for s in common] for run in series], dtype=float)
    table = np.where(np.isfinite(table), table, np.nan)
    with warnings.catch_warnings():  # an all-NaN column (every seed diverged) is a gap, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.array(common), np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def plot_curves(curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], path: Path, *, title: str,
                ylabel: str, logy: bool = False) -> Path:
    """One line per variant (mean over its seeds) with a shaded min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for variant, runs in curves.items():
        steps, mean, lo, hi = band(runs)
        if steps.size == 0:
            continue
        if logy:
            mean, lo, hi = _positive(mean), _positive(lo), _positive(hi)
        label = f"{variant} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
        ax.plot(steps, mean, color=color(variant), ls=style(variant), label=label, lw=1.6,
                marker="o" if steps.size == 1 else None)  # a single point would be invisible as a line
        if len(runs) > 1:
            ax.fill_between(steps, lo, hi, color=color(variant), alpha=0.18, lw=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gain_vs_depth(diags: Mapping[str, Sequence[dict[str, Any]]], path: Path, *, title: str) -> Path:
    """Forward and backward Amax gain of ``H_l ... H_1`` against ``l`` (log y).

    ``diags`` maps a label (variant) to its final ``diag`` records, one per seed; the first is
    drawn solid and labelled, the others thin.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.4), sharey=True)
    keys = (("forward_gain", "forward gain (max |row sum|)"), ("backward_gain", "backward gain (max |col sum|)"))
    drawn = False
    for ax, (key, name) in zip(axes, keys):
        for label, records in diags.items():
            for i, diag in enumerate(records):
                gains = diag.get(key) if diag else None
                if not gains:
                    continue
                depth = np.arange(1, len(gains) + 1)
                ax.plot(depth, _positive(gains), color=color(label), ls=style(label), marker="o" if i == 0 else None, ms=3,
                        lw=1.6 if i == 0 else 0.8, alpha=1.0 if i == 0 else 0.5, label=label if i == 0 else None)
                drawn = True
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        _log_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("depth l (composite of sublayers 1..l)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("Amax gain of H_l...H_1")
    if drawn:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_max_gain_vs_step(series: Mapping[str, Sequence[Sequence[dict[str, Any]]]], path: Path, *,
                          title: str) -> Path:
    """Largest forward / backward composite gain (over depth, prefix and suffix) at each diag step.

    ``series`` maps a variant to its runs, each a list of ``diag`` records (with ``step``).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.4), sharey=True)
    keys = (("max_forward_gain", "max forward gain"), ("max_backward_gain", "max backward gain"))
    drawn = False
    for ax, (key, name) in zip(axes, keys):
        for variant, runs in series.items():
            for i, records in enumerate(runs):
                pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if not pts:
                    continue
                steps, vals = zip(*pts)
                ax.plot(steps, _positive(vals), color=color(variant), ls=style(variant), lw=1.6 if i == 0 else 0.8,
                        alpha=1.0 if i == 0 else 0.5, label=variant if i == 0 else None)
                drawn = True
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        _log_axis(ax)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("Amax gain (max over depth)")
    if drawn:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def heatmap_panels(diag: dict[str, Any]) -> list[tuple[str, list[list[float]]]]:
    """``[(title, matrix)]``: first, middle and last sublayer's mean ``h_res`` and the composite."""
    subs = [s for s in diag.get("sublayers", []) if s.get("h_res_mean") is not None]
    if not subs:
        return []
    picks = sorted({0, (len(subs) - 1) // 2, len(subs) - 1})
    panels = [(f"{subs[i]['name'].removeprefix('blocks.')} (#{i + 1})", subs[i]["h_res_mean"]) for i in picks]
    if diag.get("composite_mean") is not None:
        panels.append((f"composite of all {len(subs)}", diag["composite_mean"]))
    return panels


def _fmt_cell(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a >= 100 or a < 0.01):
        mant, exp = f"{v:.1e}".split("e")
        return f"{mant}e{int(exp)}"  # 3.1e4, not 3.1e+04: fits a heatmap cell
    return f"{v:.2f}"


def plot_heatmaps(diags: Mapping[str, dict[str, Any]], path: Path, *, title: str) -> Path:
    """One row per label (variant), one column per :func:`heatmap_panels` matrix, values annotated."""
    plt = _plt()
    rows = [(label, heatmap_panels(d)) for label, d in diags.items()]
    rows = [(label, p) for label, p in rows if p]
    ncols = max((len(p) for _, p in rows), default=1)
    nrows = max(1, len(rows))
    n = len(rows[0][1][0][1]) if rows else 1
    cell = 0.42 if n <= 4 else 0.3
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * max(2.3, n * cell + 0.8), nrows * max(2.1, n * cell + 0.7)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (label, panels) in enumerate(rows):
        for c, (name, mat) in enumerate(panels):
            ax = axes[r][c]
            ax.axis("on")
            m = _finite(np.asarray(mat, dtype=float).tolist())
            lim = np.nanmax(np.abs(m)) if _any_finite(m) else 1.0
            lim = lim if lim > 0 else 1.0
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            for (i, j), v in np.ndenumerate(np.asarray(mat, dtype=float)):
                ax.text(j, i, _fmt_cell(v), ha="center", va="center", fontsize=6.5 if n <= 4 else 5,
                        color="white" if np.isfinite(v) and abs(v) > 0.6 * lim else "black")
            ax.set_xticks(range(len(mat)))
            ax.set_yticks(range(len(mat)))
            ax.tick_params(labelsize=6)
            ax.set_title(f"{label}: {name}", fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
