"""``mhckit diagnose``: hyper-connection diagnostics of one checkpoint, as tables and figures.

Loads a run's latest good checkpoint, runs :func:`mhckit.train.monitor.collect` on one
validation batch (fixed windows of the validation split), prints a per-sublayer table (``h_res``
diagonal mean, distance from the identity, row / column sum errors, ``h_pre`` / ``h_post``
means) and the composite gains against depth, and writes ``gain_vs_depth.png`` and
``h_res_heatmaps.png`` plus ``diagnose.json`` (the raw record) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from . import plots

FIG_GAIN = "gain_vs_depth.png"
FIG_HEAT = "h_res_heatmaps.png"


def _g(v: Any, fmt: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:.3e}"
    return format(v, fmt)


def sublayer_table(diag: dict[str, Any]) -> str:
    head = ("sublayer", "h_res diag", "||h_res - I||", "row sum err", "col sum err", "h_pre mean", "h_pre sum",
            "h_post mean")
    rows = [head]
    for s in diag["sublayers"]:
        r = s.get("h_res") or {}
        rows.append((s["name"], _g(r.get("diag_mean")), _g(r.get("identity_distance")), _g(r.get("max_row_sum_err"), ".2e"),
                     _g(r.get("max_col_sum_err"), ".2e"), _g(s["h_pre"]["mean"]), _g(s["h_pre"]["sum_mean"]),
                     _g(s["h_post"]["mean"])))
    return _align(rows)


def gain_table(diag: dict[str, Any]) -> str:
    if diag.get("forward_gain") is None:
        return "(no h_res: no composite gains)"
    rows = [("depth l", "fwd H_l..H_1", "bwd H_l..H_1", "max|log col| H_l..H_1", "fwd H_L..H_l", "bwd H_L..H_l")]
    for i in range(len(diag["forward_gain"])):
        rows.append((str(i + 1), _g(diag["forward_gain"][i]), _g(diag["backward_gain"][i]),
                     _g(diag["max_abs_log_colsum"][i]), _g(diag["suffix_forward_gain"][i]),
                     _g(diag["suffix_backward_gain"][i])))
    return _align(rows)


def _align(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def diagnose(run: Path | str, out: Path | str | None = None, data: str | None = None, batch_size: int = 8,
             device: str = "auto", log=print) -> dict[str, Any]:
    """Run the diagnostics; returns ``{"diag", "figures", "variant", "step"}`` and writes into ``out``."""
    from .data import load_token_data
    from .monitor import collect
    from .sample import load_run_model

    loaded = load_run_model(run, device, log)
    cfg = loaded.cfg
    tokens = load_token_data(data if data is not None else cfg.data, cfg.tokenizer, cfg.cache_dir, cfg.val_fraction)
    x, _ = next(iter(tokens.eval_batches(batch_size, cfg.model.seq_len, max_batches=1, device=loaded.device)))
    diag = collect(loaded.model, x)
    variant, step = cfg.model.hc.variant, loaded.checkpoint.step
    out_dir = Path(out) if out is not None else Path(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diagnose.json").write_text(json.dumps({"step": step, "variant": variant, **diag}, indent=1))
    figs: dict[str, Path] = {}
    label = f"{variant} (step {step})"
    if diag.get("forward_gain") is not None:
        figs["gain_depth"] = plots.plot_gain_vs_depth({variant: [diag]}, out_dir / FIG_GAIN,
                                                      title=f"{label}: composite gain against depth")
        figs["heatmaps"] = plots.plot_heatmaps({variant: diag}, out_dir / FIG_HEAT,
                                               title=f"{label}: token-averaged h_res")
    return {"diag": diag, "figures": figs, "variant": variant, "step": step, "out": out_dir}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mhckit diagnose", allow_abbrev=False,
                                description="Hyper-connection diagnostics of a run's latest checkpoint on a validation "
                                            "batch: per-sublayer table, composite gains, gain and h_res figures.")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/compare-default/mhc-s0")
    p.add_argument("--out", default=None, help="where to write the figures and diagnose.json (default: the run directory)")
    p.add_argument("--data", default=None, help="text file or directory for the validation batch (default: the run's data)")
    p.add_argument("--batch_size", type=int, default=8, help="validation windows in the probe batch (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size: got {args.batch_size}; expected an int >= 1")
    try:
        res = diagnose(args.run, args.out, args.data, args.batch_size, args.device)
    except ValueError as e:
        parser.error(str(e))
    diag = res["diag"]
    cos = diag.get("stream_cosine") if diag["sublayers"] else None
    print(f"{args.run}: variant {res['variant']}, step {res['step']}, stream cosine {_g(cos, '.3f')}")
    if not diag["sublayers"]:
        print("no hyper-connection sublayers (a plain residual model): nothing to diagnose, no figures written")
        return 0
    print("\nper sublayer (token means over the batch; errors are max |sum - 1|):")
    print(sublayer_table(diag))
    print("\ncomposite Amax gains (1 is ideal):")
    print(gain_table(diag))
    if diag.get("max_forward_gain") is not None:
        print(f"\nmax composite gain: forward {_g(diag['max_forward_gain'])}, backward {_g(diag['max_backward_gain'])}")
    for path in res["figures"].values():
        print(f"wrote {path}")
    print(f"wrote {res['out'] / 'diagnose.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
