"""Where the CPU coefficient kernels should run the matmuls with phi: in the kernel or in BLAS.

    python -m benchmarks.bench_route [--tokens 1024 --n 4,5,6,8 --C 64,256,512 --isa avx2]

For each (n, C) the coefficient op (``mhckit.functional.mhc_coeffs``, fp32, forward + backward) is
timed with the matmuls forced into the kernel and forced into BLAS (``mhckit.ops.cpu``'s
``PROJECT_MAX_WIDTH`` / ``PROJECT_MAX_COLUMNS``), interleaved in one process; the ratio is BLAS's time
over the kernel's (above 1: the kernel is faster), and the last column says which route the defaults
take. ``mhckit.ops.cpu.PROJECT_MAX_COLUMNS``'s default comes from these numbers (``--isa avx2``: the
portable 8-lane blocks, on an AVX-512 machine). Results: benchmarks/results/route_cpu[_<isa>].{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from benchmarks.bench_ops import make_inputs, timed_case
from benchmarks.harness import command_line, compare, save_results
from mhckit import functional as F
from mhckit.ops import cpu

RESULTS = Path(__file__).parent / "results"


@contextlib.contextmanager
def route(kernel: bool):
    """The matmuls with phi in the kernel (``kernel``) or in BLAS, at every width and n."""
    saved = cpu.PROJECT_MAX_WIDTH, cpu.PROJECT_MAX_COLUMNS
    cpu.PROJECT_MAX_WIDTH, cpu.PROJECT_MAX_COLUMNS = (10**9, 10**9) if kernel else (0, 0)
    try:
        yield
    finally:
        cpu.PROJECT_MAX_WIDTH, cpu.PROJECT_MAX_COLUMNS = saved


def routed(kernel: bool, inp: dict):
    run = timed_case(lambda: F.mhc_coeffs(inp["x"], inp["phi"], inp["bias"], inp["alpha"]), "fwd+bwd")

    def case():
        with route(kernel):
            run()
    return case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--n", default="4,5,6,8")
    p.add_argument("--C", default="64,256,512")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--isa", default=None, choices=cpu.ISAS, help="the kernels built for this instruction set "
                   "(mhckit.ops.cpu.use_isa; default: the process's own build)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.command = command_line(__spec__ and __spec__.name, argv)  # what the results say made them
    if not cpu.status()["active"]:
        raise SystemExit(f"the compiled CPU kernels are unavailable: {cpu.status()['why']}")
    with cpu.use_isa(args.isa) if args.isa else contextlib.nullcontext():
        return _run(args)


def _run(args) -> int:
    results = []
    for n in map(int, args.n.split(",")):
        for c in map(int, args.C.split(",")):
            inp = make_inputs(args.tokens, c, n, torch.float32, "cpu")
            default = "kernel" if cpu._project_here(n, c, n * n + 2 * n, torch.float32) else "blas"
            params = {"tokens": args.tokens, "n": n, "C": c, "default_route": default}
            res = compare({"kernel": routed(True, inp), "blas": routed(False, inp)}, "kernel", rounds=args.rounds,
                          params=params)
            blas = next(r for r in res if r.case == "blas")
            print(f"n={n} C={c:5d}  kernel {res[0].median_ms:8.3f} ms  blas {blas.median_ms:8.3f} ms  "
                  f"blas / kernel x{blas.ratio:.2f}  (default: {default})")
            results += res
    stem = Path(args.out) if args.out else RESULTS / ("route_cpu" + (f"_{args.isa}" if args.isa else ""))
    save_results(results, stem, args.command, isa=cpu.status()["isa"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
