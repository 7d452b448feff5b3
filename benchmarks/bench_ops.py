"""Op-level benchmark: coefficients, Sinkhorn, pre, post-res; forward, backward and both.

    python -m benchmarks.bench_ops [--tokens 2048,8192 --C 512 --n 4 --backends torch,reference]

For each op and shape, every backend is timed interleaved (A B A B ...) in one process; ratios
are against the first backend listed. ``torch@avx2`` (any ``backend@isa``) is that backend with the
CPU kernels built for that instruction set (``mhckit.ops.cpu.use_isa``), e.g.
``--backends torch@avx2,torch`` compares the AVX2 and AVX-512 builds.
Results: benchmarks/results/ops_<device>.{csv,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.harness import command_line, compare, save_results
from mhckit import functional as F
from mhckit.ops import cpu

RESULTS = Path(__file__).parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")


def make_inputs(t: int, c: int, n: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    k = n * n + 2 * n

    def rnd(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()

    return {
        "x": rnd(t, n, c, dt=dtype), "y": rnd(t, c, dt=dtype), "phi": rnd(n * c, k, scale=0.02),
        "bias": rnd(k), "alpha": rnd(3, scale=0.1), "h_pre": rnd(t, n), "h_post": rnd(t, n),
        "h_res": rnd(t, n, n), "logits": rnd(t, n, n, scale=2.0),
    }


def op_fn(op: str, inp: dict, backend: str):
    if op == "coeffs":
        return lambda: F.mhc_coeffs(inp["x"], inp["phi"], inp["bias"], inp["alpha"], backend=backend)
    if op == "sinkhorn":
        return lambda: F.sinkhorn(inp["logits"], 20, backend=backend)
    if op == "pre":
        return lambda: F.mhc_pre(inp["x"], inp["h_pre"], backend=backend)
    if op == "post_res":
        return lambda: F.mhc_post_res(inp["x"], inp["y"], inp["h_post"], inp["h_res"], backend=backend)
    raise ValueError(op)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def timed_case(fn, mode: str):
    """A zero-argument callable timing ``mode`` of ``fn`` (bwd: forward done once, graph retained)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
        return run
    if mode == "fwd+bwd":
        def run():
            outs = _outputs(fn())
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return run
    outs = _outputs(fn())
    grads = [torch.ones_like(o) for o in outs]

    def run():
        torch.autograd.backward(outs, grads, retain_graph=True)
    return run


def _case(op: str, inp: dict, backend: str, mode: str):
    """``timed_case`` of ``backend``, or for ``backend@isa`` of ``backend`` on the kernels built for ``isa``
    (built, and for the bwd mode its forward run, inside the switch too)."""
    name, _, isa = backend.partition("@")
    if not isa:
        return timed_case(op_fn(op, inp, name), mode)
    with cpu.use_isa(isa):
        run = timed_case(op_fn(op, inp, name), mode)

    def switched():
        with cpu.use_isa(isa):
            run()
    return switched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--C", default="512")
    p.add_argument("--n", default="4")
    p.add_argument("--ops", default="coeffs,sinkhorn,pre,post_res")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backends", default="torch,reference")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    backends = args.backends.split(",")
    results = []
    for t in map(int, args.tokens.split(",")):
        for c in map(int, args.C.split(",")):
            for n in map(int, args.n.split(",")):
                inp = make_inputs(t, c, n, dtype, args.device)
                for op in args.ops.split(","):
                    for mode in args.modes.split(","):
                        cases = {b: _case(op, inp, b, mode) for b in backends}
                        params = {"op": op, "mode": mode, "tokens": t, "C": c, "n": n, "dtype": args.dtype}
                        res = compare(cases, backends[0], rounds=args.rounds, device=args.device, params=params)
                        for r in res:
                            print(f"{op:8s} {mode:7s} T={t:6d} C={c:5d} n={n} {r.case:10s} {r.median_ms:9.3f} ms "
                                  f"x{r.ratio:.2f}")
                        results += res
    suffix = "" if dtype == torch.float32 else f"_{args.dtype}"  # the fp32 results keep their name
    stem = Path(args.out) if args.out else RESULTS / f"ops_{args.device}{suffix}"
    save_results(results, stem, command_line(__spec__ and __spec__.name, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
