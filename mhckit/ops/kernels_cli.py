"""``mhckit kernels``: build the compiled CPU kernels and the C++ pair ahead of a run (``make setup``
does), and say which of them run here and why not."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="mhckit kernels", description=__doc__.splitlines()[0]).parse_args(argv)
    from . import cpu
    from .cpu import _pair

    st = cpu.status()
    print("C kernels:", f"active ({st['isa']}, OpenMP {st['openmp']})" if st["active"] else f"not active ({st['why']})",
          "|", st["path"])
    ps = _pair.status()
    state = "active" if ps["active"] else "switched off (MHCKIT_CPP_PAIR=0)" if not ps["on"] else f"not active ({ps['why']})"
    print("C++ pair: ", state, "|", ps["path"])
    return 0
