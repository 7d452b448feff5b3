"""Layer-level benchmark: one wrapped layer, forward + backward, against the plain residual and peers.

    python -m benchmarks.bench_layer [--B 8 --T 256 --C 512 --n 4 --branch linear,mlp --rounds 15]
                                     [--dtype float32|bfloat16|float16]

Cases (each fwd+bwd of one layer, same branch module, interleaved, paired ratios vs residual):
    residual            x + f(x) on [B, T, C]
    mhckit              mhckit.HyperConnection(variant="mhc"), default backend
    mhckit-reference    the same with backend="reference" (plain autograd through the spec)
    hyper-connections   lucidrains' `hyper-connections` mHC (if installed: `pip install -e ".[bench]"`,
                        pinned), exp-domain Sinkhorn
    hyper-connections-log   the same with its log-domain Sinkhorn
Every tensor and module is cast to --dtype (a bf16 / fp16 model: the streams in that dtype, mhckit's
coefficients in fp32). Results go to benchmarks/results/layer_<device>.{csv,md} (float32) or
layer_<device>_<dtype>.{csv,md} with hardware, versions and commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import mhckit
from mhckit.ops import cpu as cpu_kernels
from benchmarks.harness import command_line, compare, save_results

RESULTS = Path(__file__).parent / "results"


def make_branch(kind: str, c: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(c, c)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
    raise ValueError(f"--branch: got {kind!r}; expected 'linear' or 'mlp'")


def fwd_bwd(fn, x):
    def run():
        out = fn(x)
        out.backward(torch.ones_like(out))
        x.grad = None

    return run


def without_cpu_kernels(run):
    def wrapped():
        with cpu_kernels.disabled():
            run()

    return wrapped


def peer_versions() -> dict:
    """The installed versions of the peers measured here (``pip install -e ".[bench]"`` pins them)."""
    from importlib import metadata

    out = {}
    for dist in ("hyper-connections",):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def peer_cases(branch: nn.Module, c: int, n: int, xs: torch.Tensor) -> dict:  # xs: the streams' dtype
    try:
        from hyper_connections import mc_get_init_and_expand_reduce_stream_functions
    except ImportError:
        return {}
    cases = {}
    for name, log_domain in (("hyper-connections", False), ("hyper-connections-log", True)):
        init, expand, _ = mc_get_init_and_expand_reduce_stream_functions(n, sinkhorn_iters=20)
        hc = init(dim=c, branch=branch, layer_index=0, log_domain_sinkhorn=log_domain).to(xs.device, xs.dtype)
        x = expand(xs.detach()).requires_grad_()  # [(B n), T, C]
        cases[name] = fwd_bwd(hc, x)
    return cases


def bench(b: int, t: int, c: int, n: int, kind: str, rounds: int, peers: bool, device: str,
          dtype: torch.dtype = torch.float32) -> list:
    torch.manual_seed(0)
    branch = make_branch(kind, c).to(device, dtype)
    x1 = torch.randn(b, t, c, device=device, dtype=dtype, requires_grad=True)
    xn = torch.randn(b, t, n, c, device=device, dtype=dtype, requires_grad=True)
    cases = {"residual": fwd_bwd(lambda x: x + branch(x), x1)}
    for name, backend in (("mhckit", "auto"), ("mhckit-reference", "reference")):
        hc = mhckit.HyperConnection(c, branch, n_streams=n, variant="mhc", backend=backend).to(device, dtype)
        with torch.no_grad():
            hc.coeffs.phi.normal_(std=0.02)  # non-trivial coefficients
        cases[name] = fwd_bwd(hc, xn)
        if name == "mhckit" and device == "cpu":  # the same layer without the compiled CPU kernels
            cases["mhckit-torch-ops"] = without_cpu_kernels(fwd_bwd(hc, xn))
    if peers:
        cases.update(peer_cases(branch, c, n, x1))
    params = {"B": b, "T": t, "C": c, "n": n, "branch": kind, "dtype": str(dtype).removeprefix("torch.")}
    return compare(cases, "residual", rounds=rounds, device=device, params=params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--C", type=int, default=512)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--branch", default="linear,mlp")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="of the streams, the branch and the parameters (a model cast with .to(dtype))")
    p.add_argument("--out", default=None,
                   help="results stem (default benchmarks/results/layer_<device>, layer_<device>_<dtype> if not fp32)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    results = []
    for kind in args.branch.split(","):
        res = bench(args.B, args.T, args.C, args.n, kind, args.rounds, not args.no_peers, args.device, dtype)
        for r in res:
            print(f"{kind:6s} {r.case:22s} {r.median_ms:9.2f} ms   x{r.ratio:.2f} vs residual "
                  f"(IQR {r.ratio_iqr[0]:.2f}-{r.ratio_iqr[1]:.2f})")
        results += res
    suffix = "" if dtype == torch.float32 else f"_{args.dtype}"
    stem = Path(args.out) if args.out else RESULTS / f"layer_{args.device}{suffix}"
    save_results(results, stem, command_line(__spec__ and __spec__.name, argv), peers=peer_versions())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
