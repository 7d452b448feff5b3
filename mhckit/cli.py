"""The ``mhckit`` command: ``mhckit <command> [options]``; ``mhckit <command> --help`` for each."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "compare": ("mhckit.train.compare", "train residual / HC / mHC / mHC-lite GPTs and write a report (the main job)"),
    "train": ("mhckit.train.cli_train", "train one GPT from a preset and --key=value overrides"),
    "sample": ("mhckit.train.sample", "generate text from a checkpoint"),
    "diagnose": ("mhckit.train.diagnose", "diagnostics and plots for a checkpoint"),
    "demo": ("mhckit.demo", "a 10-second end-to-end example (no download)"),
    "retrofit": ("mhckit.integrations.retrofit_cli", "retrofit a Hugging Face decoder with mHC and train it next to the original"),
    "kernels": ("mhckit.ops.kernels_cli", "build the compiled CPU kernels and the C++ pair ahead; say which run"),
}


def usage() -> str:
    lines = ["usage: mhckit <command> [options]", "", "commands:"]
    lines += [f"  {name:9s} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mhckit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
