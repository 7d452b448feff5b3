"""``mhckit compare``: train residual / HC / mHC / mHC-lite GPTs on one budget and write a report.

Every variant x seed is one ordinary training run (:func:`mhckit.train.trainer.train`) in
``<out_dir>/<name>/<variant>-s<seed>/``. For a given seed every variant starts from the same
``torch`` seed and draws the same batches (the sampler is seeded by ``cfg.seed``), so the only
difference between runs of one seed is the residual connection. Runs are ordered seed-major
(``residual-s0, hc-s0, ..., residual-s1, ...``) so that machine noise spreads over variants.

Re-running the same command continues a killed comparison: a run whose ``summary.json`` exists and
whose ``config.json`` matches is skipped; a run with checkpoints is resumed from the last one; a
run directory trained with a different configuration is an error (choose another ``--name``).

A run that diverges (the trainer's :class:`~mhckit.train.trainer.NonFiniteTrainingError`:
``max_bad_steps`` non-finite steps in a row) is an outcome, not a crash: its directory gets
``diverged.json`` (the step, the last good checkpoint, the message), the comparison goes on with
the other runs, and the report shows it as diverged. A diverged run is finished like one with
``summary.json``: re-running the same command skips it (the same configuration would diverge
again); to retry it, delete ``diverged.json`` (it resumes from its last good checkpoint) or change
the configuration under another ``--name``.

After training, each run's memory is measured once (:mod:`mhckit.train.memory`; CUDA peak while
training on GPUs) and ``report.md`` plus figures are written by :mod:`mhckit.train.report`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import VARIANTS
from . import checkpoint as ckpt
from .cli_train import build_config
from .config import TrainConfig
from .overrides import apply_overrides, help_text, parse_overrides
from .presets import PRESETS
from .report import divergence_sentences, gain_sentences, run_name, write_report

DEFAULT_VARIANTS = ("residual", "hc", "mhc", "mhc-lite")
DEFAULT_PRESET = "default"
# Fields that do not change a run's result: a finished run trained with other values is still valid.
IGNORED_FIELDS = ("resume", "progress", "out_dir", "cache_dir", "threads", "keep_ckpts", "name", "keep_freed_memory")
# Fields compare sets itself for every run.
# How many seeds `mhckit compare --preset=P` runs by default, sized with the preset's budget (the
# seed count is not a TrainConfig field, so it lives here rather than in the presets).
COMPARE_SEEDS = {"default": 3, "stress": 2, "gpu-small": 3, "gpu-124m": 2}
MANAGED = {"model.hc.variant": "--variants", "name": "--name", "resume": "(automatic)"}
DIVERGED = "diverged.json"  # the marker of a run stopped by NonFiniteTrainingError (written in its run dir)


class CompareError(ValueError):
    """A comparison that cannot start (bad data, a run directory trained with another config)."""


# --------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    defaults = build_config(DEFAULT_PRESET, [])
    presets = ", ".join(sorted(PRESETS))
    parser = argparse.ArgumentParser(
        prog="mhckit compare",
        description=textwrap.fill(
            "Train GPTs that differ only in their residual connection (same seed, data order and budget), "
            "over several seeds, then write <out_dir>/<name>/report.md with figures and print the results table. "
            "Re-running the same command skips finished runs and resumes interrupted ones. "
            "With no options: the 'default' preset (~3 minutes on an idle 2-core CPU).", 100, break_on_hyphens=False
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --seed (a TrainConfig field) must not become --seeds
        epilog=(
            "training options (--key=value, passed to every run; a bare field name works when unambiguous).\n"
            + textwrap.fill(
                f"Defaults shown are the '{DEFAULT_PRESET}' preset's; --preset changes them. Managed by compare: "
                "--name names the comparison (runs are <variant>-s<seed>), --seed is the first seed, "
                "--variants replaces --model.hc.variant, --resume is automatic.", 100)
            + "\n"
            + help_text(TrainConfig, defaults)
        ),
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"named configuration ({presets}); default: %(default)s")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: %(default)s)")
    parser.add_argument("--seeds", default=None, type=int,
                        help="number of seeds; runs use seed, seed+1, ... (default: "
                        + ", ".join(f"{n} for {p}" for p, n in COMPARE_SEEDS.items()) + ")")
    parser.add_argument("--name", default=None,
                        help="comparison name: results go to <out_dir>/<name>/ (default: compare-<preset>)")
    return parser


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants:
        raise ValueError(f"--variants: got {text!r}; expected a comma-separated subset of {', '.join(VARIANTS)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {', '.join(map(repr, bad))}; expected a subset of {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--variants: got {text!r} with a repeated variant")
    return variants


def preset_seeds(preset: str) -> int:
    """How many seeds ``mhckit compare --preset=P`` runs when ``--seeds`` is not given."""
    return int(COMPARE_SEEDS.get(preset, 2))


# --------------------------------------------------------------------------- one run


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for key in IGNORED_FIELDS:
        d.pop(key, None)
    return d


def config_diff(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``["steps: 150 on disk, 200 now", ...]`` between two config dicts (ignored fields dropped)."""
    a, b = (_normalise(stored), _normalise(wanted)) if not prefix else (stored, wanted)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} on disk, {vb!r} now")
    return out


def run_state(run_dir: Path, cfg: TrainConfig) -> str:
    """``"done"``, ``"diverged"``, ``"partial"`` (has checkpoints) or ``"new"``; raises if trained with
    another config. ``"diverged"`` (a ``diverged.json`` marker) is finished, like ``"done"``: never retrained."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return "partial" if ckpt.complete_checkpoints(run_dir) else "new"
    stored = json.loads(config_path.read_text()).get("config", {})
    diff = config_diff(stored, asdict(cfg))
    if diff:
        raise CompareError(
            f"name: {run_dir} was trained with a different configuration ({'; '.join(diff[:4])}); "
            "pass another --name or delete that directory"
        )
    if (run_dir / "summary.json").exists():
        return "done"
    if (run_dir / DIVERGED).exists():
        return "diverged"
    return "partial" if ckpt.complete_checkpoints(run_dir) else "new"


def measure_memory(run_dir: Path, cfg: TrainConfig, data, device: torch.device) -> dict[str, Any]:
    """Estimated training memory of the run's final model on a fresh training batch (RNG untouched);
    on the CPU, of the compiled model's step where the run compiles (its graph decides what is saved,
    e.g. the checkpoint regions of compiled recomputation). On CUDA the report uses the allocator's
    peak, so the estimate stays the eager model's (no second compilation)."""
    from ..models.gpt import GPT
    from .memory import estimate_training_memory
    from .trainer import autocast_context

    found = ckpt.find_checkpoint(run_dir)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = GPT(cfg.model).to(device)
        if found is not None:
            ckpt.load_weights(found.path, model)
        gen = torch.Generator().manual_seed(10_000 + cfg.seed)
        x, y = data.get_batch("train", cfg.batch_size, cfg.model.seq_len, gen, device=device)
        compiled = cfg.compile and device.type == "cpu"
        return estimate_training_memory(torch.compile(model) if compiled else model, x, y,
                                        autocast_context(cfg, device))


def load_average() -> float | None:
    """The 1-minute load average at the end of a run (a busy machine makes throughput noisy)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def count_params(cfg: TrainConfig) -> int:
    """Parameters of the run's model, counted on the meta device (no memory, RNG untouched)."""
    from ..models.gpt import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg.model).parameters())


def divergence_step(run_dir: Path, message: str) -> int | None:
    """The step a diverged run stopped at: its ``kind="stop"`` record, else the ``at step N`` of the message."""
    from .report import read_metrics

    try:
        stops = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "stop"]
    except ValueError:  # a torn last line: fall back to the message
        stops = []
    if stops:
        return int(stops[-1]["step"])
    found = re.search(r"at step (\d+)", message)
    return int(found.group(1)) if found else None


def write_divergence(run_dir: Path, cfg: TrainConfig, err: Exception, log=print) -> dict[str, Any]:
    """Write ``diverged.json`` for a run stopped by ``NonFiniteTrainingError``; returns its content."""
    last = ckpt.find_checkpoint(run_dir, log)
    marker = {
        "name": cfg.name, "variant": cfg.model.hc.variant, "seed": cfg.seed, "steps": cfg.steps,
        "step": divergence_step(run_dir, str(err)),
        "last_good_checkpoint": str(last.path) if last else None, "last_good_step": last.step if last else None,
        "params": count_params(cfg), "error": str(err),
    }
    (run_dir / DIVERGED).write_text(json.dumps(marker, indent=1))
    return marker


def train_one(cfg: TrainConfig, data, log=print) -> dict[str, Any]:
    """Train (or resume) one run and write its ``compare_run.json``; returns that record.

    A run stopped by :class:`~mhckit.train.trainer.NonFiniteTrainingError` writes ``diverged.json``
    (:func:`write_divergence`) and its record carries that marker under ``"diverged"``.
    """
    from .trainer import NonFiniteTrainingError, resolve_device, train

    run_dir = Path(cfg.out_dir) / cfg.name
    device = resolve_device(cfg)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    (run_dir / DIVERGED).unlink(missing_ok=True)  # a stale marker from a run trained again
    t0 = time.perf_counter()
    diverged = None
    try:
        train(cfg, data=data, log=log)
    except NonFiniteTrainingError as e:  # an outcome of the comparison, not a crash
        diverged = write_divergence(run_dir, cfg, e, log)
    wall = time.perf_counter() - t0
    record = {
        "wall_s": wall,
        "load_avg": load_average(),
        "resumed": cfg.resume,
        "device": str(device),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "memory": measure_memory(run_dir, cfg, data, device),
    }
    if diverged is not None:
        record["diverged"] = diverged
    (run_dir / "compare_run.json").write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------- the comparison


def run_config(base: TrainConfig, compare_dir: Path, variant: str, seed: int, vocab: int) -> TrainConfig:
    return apply_overrides(base, {
        "name": run_name(variant, seed), "out_dir": str(compare_dir), "seed": seed, "resume": False,
        "model.vocab_size": vocab, "model.hc.variant": variant,
    })


def run_compare(base: TrainConfig, variants: list[str], seeds: list[int], name: str, *, preset: str | None = None,
                overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Train every variant x seed (skipping finished runs), then write the report.

    Returns :func:`mhckit.train.report.write_report`'s dict plus ``wall_s`` and ``runs``
    (``{run name: {"status": "trained" | "resumed" | "diverged" | "skipped", ...}}``). A run that
    diverges now has status ``"diverged"`` and ``diverged_at`` (its step); a run that diverged in an
    earlier invocation is ``"skipped"`` with ``diverged_at``.
    """
    from .data import load_token_data
    from .trainer import resolve_device

    t_start = time.perf_counter()
    compare_dir = Path(base.out_dir) / name
    try:
        data = load_token_data(base.data, base.tokenizer, base.cache_dir, base.val_fraction)
    except ValueError as e:
        raise CompareError(str(e)) from e
    compare_dir.mkdir(parents=True, exist_ok=True)
    vocab = data.tokenizer.vocab_size
    plan = [(v, s, run_config(base, compare_dir, v, s, vocab)) for s in seeds for v in variants]
    states = {cfg.name: run_state(compare_dir / cfg.name, cfg) for _, _, cfg in plan}  # fail before any work
    runs: dict[str, dict[str, Any]] = {}
    for i, (variant, seed, cfg) in enumerate(plan, 1):
        run_dir = compare_dir / cfg.name
        state = states[cfg.name]
        tag = f"[{i}/{len(plan)}] {cfg.name}"
        if state in ("done", "diverged"):
            if state == "done":
                log(f"{tag}: finished earlier with the same configuration; skipped ({run_dir}/summary.json)")
                runs[cfg.name] = {"status": "skipped"}
            else:
                step = json.loads((run_dir / DIVERGED).read_text()).get("step")
                log(f"{tag}: diverged earlier at step {step} with the same configuration; skipped "
                    f"({run_dir / DIVERGED}; delete it to retry from the last good checkpoint)")
                runs[cfg.name] = {"status": "skipped", "diverged_at": step}
            if not (run_dir / "compare_run.json").exists():  # killed between summary and memory
                record = {"wall_s": None, "resumed": False, "cuda_peak_bytes": None,
                          "memory": measure_memory(run_dir, cfg, data, resolve_device(cfg))}
                (run_dir / "compare_run.json").write_text(json.dumps(record, indent=1))
            continue
        resume = state == "partial"
        log(f"{tag}: {'resuming' if resume else 'training'} {variant}, seed {seed}")
        record = train_one(apply_overrides(cfg, {"resume": resume}), data, log)
        if "diverged" in record:
            d = record["diverged"]
            log(f"{tag}: DIVERGED at step {d['step']} (non-finite loss or gradients; last good checkpoint: "
                f"{d['last_good_checkpoint'] or 'none'}), {record['wall_s']:.1f} s; recorded in {run_dir / DIVERGED}, "
                "left out of the loss statistics; going on with the other runs")
            runs[cfg.name] = {"status": "diverged", "diverged_at": d["step"], "wall_s": record["wall_s"]}
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        log(f"{tag}: val_loss {summary['val_loss']:.4f}, {record['wall_s']:.1f} s")
        runs[cfg.name] = {"status": "resumed" if resume else "trained", "wall_s": record["wall_s"]}
    from .runinfo import run_info

    meta = {
        "name": name, "preset": preset, "overrides": overrides or [], "variants": variants, "seeds": seeds,
        "config": json.loads(json.dumps(asdict(apply_overrides(base, {"model.vocab_size": vocab})))),
        "data": {
            "source": data.meta.get("source"), "tokenizer": data.tokenizer.name, "num_tokens": int(len(data.tokens)),
            "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
        },
        "run_info": run_info(), "runs": runs, "wall_s": time.perf_counter() - t_start,
    }
    (compare_dir / "compare.json").write_text(json.dumps(meta, indent=1))
    result = write_report(compare_dir)
    result["wall_s"] = time.perf_counter() - t_start
    result["runs"] = runs
    return result


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        variants = parse_variants(args.variants)
        overrides = parse_overrides(TrainConfig, rest)
        for key, instead in MANAGED.items():
            if key in overrides:
                raise ValueError(f"--{key}: set by compare for every run; use {instead}")
        seeds_n = preset_seeds(args.preset) if args.seeds is None else args.seeds
        if seeds_n < 1:
            raise ValueError(f"--seeds: got {seeds_n}; expected an int >= 1")
        base = build_config(args.preset, rest)
        name = args.name or f"compare-{args.preset}"
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"--name: got {name!r}; expected a directory name without '/'")
    except ValueError as e:
        parser.error(str(e))
    seeds = [base.seed + i for i in range(seeds_n)]
    try:
        result = run_compare(base, variants, seeds, name, preset=args.preset, overrides=rest)
    except CompareError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print()
    print(result["table"])
    print()
    for line in divergence_sentences(result["stats"]) + gain_sentences(result["stats"]):
        print(line.replace("**", ""))
    print(f"\nreport: {result['report']} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
