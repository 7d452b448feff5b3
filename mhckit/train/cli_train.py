"""``mhckit train``: one training run from a preset plus typed ``--key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from .config import TrainConfig
from .overrides import apply_overrides, help_text, parse_overrides
from .presets import PRESETS, preset_overrides


def build_config(preset: str | None, overrides: list[str], base: TrainConfig | None = None) -> TrainConfig:
    """Preset, then command-line overrides, validated (errors name the option) before any work."""
    cfg = base or TrainConfig()
    if preset:
        cfg = apply_overrides(cfg, preset_overrides(preset))
    return apply_overrides(cfg, parse_overrides(TrainConfig, overrides))


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (--key=value; a bare field name works when unambiguous, e.g. --variant=hc):\n"
        + help_text(TrainConfig),
    )
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="start from a named configuration")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("mhckit train", "Train one GPT (residual or a hyper-connection variant) and checkpoint it.")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = build_config(args.preset, rest)
    except ValueError as e:
        parser.error(str(e))
    from .trainer import NonFiniteTrainingError, train

    try:
        summary = train(cfg)
    except ValueError as e:  # refused before any work (bad data path, existing run, ...)
        print(f"mhckit train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as e:  # stopped mid-run; the last good checkpoint is on disk
        print(f"mhckit train: stopped: {e}", file=sys.stderr)
        return 3
    print(f"{summary['name']}: val_loss {summary['val_loss']:.4f}, {summary['params']:,} params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
