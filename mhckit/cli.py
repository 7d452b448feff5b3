"""The ``mhckit`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhckit", description="Manifold-Constrained Hyper-Connections toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train tiny residual and mHC GPTs on CPU and print gain diagnostics")
    demo.add_argument("--steps", type=int, default=60, help="training steps per model (default 60)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps: got {args.steps}; expected an int >= 1")
        from .demo import run

        run(steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
