#!/usr/bin/env python3
"""GPU check of mhckit's Triton backend: a quick parity pass, then timings and peak memory.

    python benchmarks/gpu_check.py [OUT_DIR]        (default: benchmarks/results/)

Needs only torch (CUDA), triton and numpy. Sections, each in its own try/except (an error is
recorded in the results and the script goes on):

1. parity: the Triton backend against mhckit.reference on the GPU (forward and every gradient of
   coefficients, pre, post_res; fp32 tolerances, bf16 by flash-attention's 2x rule) at small
   awkward shapes, and Triton vs torch at every benchmark shape;
2. timings (CUDA events, variants interleaved A B A B, medians and p20/p80) and peak memory
   (torch.cuda.max_memory_allocated over the call, minus what was allocated before it) of:
   coefficients fwd / fwd+bwd, pre fwd / fwd+bwd, post_res fwd / fwd+bwd, and a full mHC layer
   (coeffs + pre + Linear(C, C) branch + post_res) fwd+bwd, for backend "triton" vs "torch" (and
   "triton-pair": the fused read / write-back pair that HyperConnection runs, mhckit/ops/carry.py, and
   "reference-compiled": torch.compile of the layer on mhckit.reference's ops, a peer the speed issue
   names; MHCKIT_BENCH_COMPILED_REF=0 leaves it out),
   against a plain residual ``h + Linear(h)`` (and Liger-Kernel's LigerMHC when importable), at
   paper-like shapes: T = 16384 tokens, n = 4, C in {2560, 4096}, bf16 and fp32 streams.

Writes gpu_check.csv, gpu_check.md and gpu_check.json into OUT_DIR, tagged with the GPU name,
torch / triton versions and the git commit (or $MHCKIT_COMMIT). Environment knobs:
MHCKIT_BENCH_BUDGET_S (default 240: sections that would start later are recorded as skipped),
MHCKIT_BENCH_TOKENS (default 16384), MHCKIT_BENCH_WIDTHS (default "2560,4096"),
MHCKIT_BENCH_DTYPES (default "bfloat16,float32"), MHCKIT_BENCH_REPS (default 15).

MHCKIT_GPU_CHECK_CPU=1 runs the whole script on the CPU (Triton interpreter, tiny shapes, wall-clock
timings, no memory numbers): a smoke test of the script itself for machines without a GPU.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CPU_SMOKE = os.environ.get("MHCKIT_GPU_CHECK_CPU") == "1"
if CPU_SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before mhckit's kernels are imported

import torch  # noqa: E402

T_START = time.time()
BUDGET_S = float(os.environ.get("MHCKIT_BENCH_BUDGET_S", "240"))
TOKENS = int(os.environ.get("MHCKIT_BENCH_TOKENS", "40" if CPU_SMOKE else "16384"))
WIDTHS = [int(c) for c in os.environ.get("MHCKIT_BENCH_WIDTHS", "40" if CPU_SMOKE else "2560,4096").split(",")]
DTYPES = [getattr(torch, d) for d in os.environ.get("MHCKIT_BENCH_DTYPES", "bfloat16,float32").split(",")]
REPS = int(os.environ.get("MHCKIT_BENCH_REPS", "3" if CPU_SMOKE else "15"))
N_STREAMS = 4
# the torch.compile'd reference layer as a peer (compiles once per dtype: dynamic shapes)
COMPILED_REF = os.environ.get("MHCKIT_BENCH_COMPILED_REF", "0" if CPU_SMOKE else "1") == "1"
FIELDS = [
    "section", "op", "variant", "dtype", "tokens", "n", "C", "ms_median", "ms_p20", "ms_p80",
    "vs_torch", "peak_extra_mib", "status", "note",
]  # fmt: skip


def elapsed() -> float:
    return time.time() - T_START


def _commit() -> str:
    env = os.environ.get("MHCKIT_COMMIT")
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results"], capture_output=True, text=True)  # as runinfo
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return env or "unknown"


def meta() -> dict:
    m = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        import triton

        m["triton"] = triton.__version__
    except Exception as e:  # recorded, not fatal
        m["triton"] = f"not importable: {e}"
    try:
        import liger_kernel  # noqa: F401

        m["liger_kernel"] = getattr(liger_kernel, "__version__", "installed")
    except Exception:
        m["liger_kernel"] = "not installed"
    return m


class Results:
    """Rows appended to the CSV as they come (partial results survive a kill)."""

    def __init__(self, out: Path, tags: dict):
        self.out, self.tags, self.rows = out, tags, []
        self.csv = out / "gpu_check.csv"
        with self.csv.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS + list(tags)).writeheader()

    def add(self, **row) -> None:
        row = {k: row.get(k, "") for k in FIELDS}
        for k in ("ms_median", "ms_p20", "ms_p80", "peak_extra_mib"):
            if isinstance(row[k], float):
                row[k] = round(row[k], 4)
        if isinstance(row["vs_torch"], float):
            row["vs_torch"] = round(row["vs_torch"], 3)
        self.rows.append(row)
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS + list(self.tags)).writerow({**row, **self.tags})
        shown = {k: v for k, v in row.items() if v != ""}
        print(f"[{elapsed():6.1f}s] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


# ==================================================================================================
# Timing helpers
# ==================================================================================================
class _WallEvent:
    """Stand-in for torch.cuda.Event in the CPU smoke mode."""

    def __init__(self, enable_timing=True):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _sync():
    if not CPU_SMOKE:
        torch.cuda.synchronize()


def bench(fns: dict, reps: int = REPS, warmup: int = 2) -> dict:
    """Median / p20 / p80 milliseconds of each callable, interleaved A B A B, CUDA events."""
    event = _WallEvent if CPU_SMOKE else torch.cuda.Event
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        events = []
        for k, f in fns.items():
            s, e = event(enable_timing=True), event(enable_timing=True)
            s.record()
            f()
            e.record()
            events.append((k, s, e))
        _sync()
        for k, s, e in events:
            times[k].append(s.elapsed_time(e))
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts)] * 4
        out[k] = (statistics.median(ts), q[0], q[3])
    return out


def peak_extra_mib(fn) -> float:
    """Peak memory allocated during ``fn()`` beyond what was allocated before it (MiB)."""
    if CPU_SMOKE:
        fn()
        return 0.0
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ==================================================================================================
# Section 1: parity on the GPU (no pytest needed)
# ==================================================================================================
def _mhc_inputs(lead, n, c, dtype, seed, dev):
    g = torch.Generator().manual_seed(seed)
    k = n * n + 2 * n
    x = torch.randn(*lead, n, c, generator=g).to(dev, dtype)
    phi = (torch.randn(n * c, k, generator=g) * 0.5 / (n * c) ** 0.5).to(dev)
    bias = torch.randn(k, generator=g).to(dev)
    alpha = (torch.rand(3, generator=g) + 0.2).to(dev)
    y = torch.randn(*lead, c, generator=g).to(dev, dtype)
    return [t.requires_grad_() for t in (x, phi, bias, alpha, y)]


def _chain(F, x, phi, bias, alpha, y, **kw):
    h_pre, h_post, h_res = F.mhc_coeffs(x, phi, bias, alpha, iters=20, **kw)
    u = F.mhc_pre(x, h_pre, **kw)
    out = F.mhc_post_res(x, y + u, h_post, h_res, **kw)
    return h_pre, h_post, h_res, u, out


def _grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


def section_parity(res: Results, dev) -> None:
    from mhckit import functional as F
    from mhckit import reference as R

    names_out = ("h_pre", "h_post", "h_res", "u", "x_new")
    names_in = ("x", "phi", "bias", "alpha", "y")
    # n = 4 only (the tests cover n = 1..8): every other n costs a round of compilation
    shapes = [((37,), 4, 40)] if CPU_SMOKE else [((257,), 4, 160), ((3, 37), 4, 72)]
    for lead, n, c in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            tag = dict(section="parity", op="chain", dtype=str(dtype).split(".")[-1], n=n, C=c)
            tag["tokens"] = int(torch.tensor(lead).prod())
            try:
                if dtype == torch.float32:
                    leaves = _mhc_inputs(lead, n, c, dtype, seed=n + c, dev=dev)
                    ref, fast = _chain(R, *leaves), _chain(F, *leaves, backend="triton")
                    errs = {nm: max_rel(a, b) for nm, a, b in zip(names_out, fast, ref)}
                    g_ref, g_fast = _grads(ref, leaves, 1), _grads(fast, leaves, 1)
                    errs.update({f"d{nm}": max_rel(a, b) for nm, a, b in zip(names_in, g_fast, g_ref)})
                    ok = all(v < 1e-4 for v in errs.values())
                    note = "max rel err (limit 1e-4): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                else:  # 2x rule against the fp32 reference
                    l32 = _mhc_inputs(lead, n, c, torch.float32, seed=n + c, dev=dev)
                    xh, yh = (t.detach().to(dtype).requires_grad_() for t in (l32[0], l32[4]))
                    lh = [xh, *l32[1:4], yh]
                    gold, ref_h, fast_h = _chain(R, *l32), _chain(R, *lh), _chain(F, *lh, backend="triton")
                    g_gold, g_ref, g_fast = _grads(gold, l32, 2), _grads(ref_h, lh, 2), _grads(fast_h, lh, 2)
                    ratios = {}
                    names = names_out + tuple("d" + nm for nm in names_in)
                    for nm, g, r, f in zip(names, (*gold, *g_gold), (*ref_h, *g_ref), (*fast_h, *g_fast)):
                        e_ref = (r.double() - g.double()).abs().max().item()
                        e_fast = (f.double() - g.double()).abs().max().item()
                        ratios[nm] = (e_fast, 2 * e_ref + 1e-6)
                    ok = all(e <= lim for e, lim in ratios.values())
                    note = "err vs fp32 gold (limit 2x reference's): " + " ".join(
                        f"{k}={e:.1e}/{lim:.1e}" for k, (e, lim) in ratios.items()
                    )
                res.add(**tag, variant="triton", status="pass" if ok else "FAIL", note=note)
            except Exception as e:
                res.add(**tag, variant="triton", status="ERROR", note=f"{type(e).__name__}: {e}")
                traceback.print_exc()


# ==================================================================================================
# Section 2: timings and memory
# ==================================================================================================
_REF_LAYER: list = []


def _compiled_reference_layer():
    """``torch.compile`` of the reference layer (coeffs, pre, Linear branch, post_res on
    ``mhckit.reference``'s ops), made once so that every shape reuses it (``dynamic=True``)."""
    if not _REF_LAYER:
        from mhckit import functional as F

        def layer(x, phi, bias, alpha, w, b):
            h_pre, h_post, h_res = F.mhc_coeffs(x, phi, bias, alpha, iters=20, backend="reference")
            u = F.mhc_pre(x, h_pre, backend="reference")
            return F.mhc_post_res(x, torch.nn.functional.linear(u, w, b), h_post, h_res, backend="reference")

        _REF_LAYER.append(torch.compile(layer, dynamic=True))
    return _REF_LAYER[0]


def section_shape(res: Results, dev, dtype, c: int) -> None:
    from mhckit import functional as F

    n, t = N_STREAMS, TOKENS
    dname = str(dtype).split(".")[-1]
    base = dict(section="bench", dtype=dname, tokens=t, n=n, C=c)
    torch.manual_seed(0)
    k = n * n + 2 * n
    x = torch.randn(t, n, c, device=dev, dtype=dtype, requires_grad=True)
    phi = (torch.randn(n * c, k, device=dev) * 0.5 / (n * c) ** 0.5).requires_grad_()
    bias = torch.randn(k, device=dev).requires_grad_()
    alpha = torch.full((3,), 0.5, device=dev).requires_grad_()
    h_pre = torch.rand(t, n, device=dev, requires_grad=True)
    h_post = (2 * torch.rand(t, n, device=dev)).requires_grad_()
    h_res = torch.softmax(torch.randn(t, n, n, device=dev), -1).requires_grad_()
    y = torch.randn(t, c, device=dev, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(c, c, device=dev, dtype=dtype)

    ops = {
        "coeffs": (lambda b: F.mhc_coeffs(x, phi, bias, alpha, backend=b), (x, phi, bias, alpha)),
        "pre": (lambda b: F.mhc_pre(x, h_pre, backend=b), (x, h_pre)),
        "post_res": (lambda b: F.mhc_post_res(x, y, h_post, h_res, backend=b), (x, y, h_post, h_res)),
    }
    for op, (call, leaves) in ops.items():
        if elapsed() > BUDGET_S:
            res.add(**base, op=op, status="skipped", note="time budget")
            continue
        try:
            outs = {b: call(b) for b in ("triton", "torch")}  # also compiles / autotunes triton
            outs = {b: o if isinstance(o, tuple) else (o,) for b, o in outs.items()}
            diff = max(max_rel(a, b) for a, b in zip(outs["triton"], outs["torch"]))
            grads_out = [torch.randn_like(o) for o in outs["torch"]]
            gt = torch.autograd.grad(outs["triton"], leaves, grads_out)
            gr = torch.autograd.grad(outs["torch"], leaves, grads_out)
            gdiff = max(max_rel(a, b) for a, b in zip(gt, gr))
            del outs, gt, gr
            limit = 2e-2 if dtype != torch.float32 else 1e-3  # vs max |value|; bf16 ulp is 4e-3
            agree = diff < limit and gdiff < limit
            check = f"triton vs torch max rel diff: fwd {diff:.1e}, grads {gdiff:.1e} (limit {limit:.0e})"

            def fwd(b):
                return lambda: call(b)

            def fwd_bwd(b):
                def f():
                    o = call(b)
                    o = o if isinstance(o, tuple) else (o,)
                    torch.autograd.grad(o, leaves, grads_out)

                return f

            for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                fns = {b: make(b) for b in ("triton", "torch")}
                timing = bench(fns)
                for b, f in fns.items():
                    med, p20, p80 = timing[b]
                    res.add(
                        **base, op=f"{op} {mode}", variant=b, ms_median=med, ms_p20=p20, ms_p80=p80,
                        vs_torch=timing["torch"][0] / med, peak_extra_mib=peak_extra_mib(f),
                        status="ok" if b == "torch" or agree else "FAIL", note=check if b == "triton" else "",
                    )  # fmt: skip
        except Exception as e:
            res.add(**base, op=op, status="ERROR", note=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        gc.collect()
        if not CPU_SMOKE:
            torch.cuda.empty_cache()

    # the full layer, fwd+bwd, against a plain residual of the same branch
    if elapsed() > BUDGET_S:
        res.add(**base, op="layer fwd+bwd", status="skipped", note="time budget")
        return
    try:
        h = torch.randn(t, c, device=dev, dtype=dtype, requires_grad=True)
        params = [x, phi, bias, alpha, lin.weight, lin.bias]
        g_out = torch.randn_like(x)

        def mhc(backend):
            def f():
                h_pre_, h_post_, h_res_ = F.mhc_coeffs(x, phi, bias, alpha, backend=backend)
                u = F.mhc_pre(x, h_pre_, backend=backend)
                out = F.mhc_post_res(x, lin(u), h_post_, h_res_, backend=backend)
                torch.autograd.grad(out, params, g_out)

            return f

        def mhc_pair():  # what HyperConnection runs on the Triton backend (mhckit/ops/carry.py)
            u, h_pre_, h_post_, h_res_, carrier = F._mhc_read_carry(x, phi, bias, alpha, iters=20, rms_eps=1e-6,
                                                                    triton=True)
            out = F._mhc_write_carry(x, carrier, lin(u), h_post_, h_res_, True)
            torch.autograd.grad(out, params, g_out)

        g_h = torch.randn_like(h)

        def residual():
            out = h + lin(h)
            torch.autograd.grad(out, [h, lin.weight, lin.bias], g_h)

        fns = {"triton": mhc("triton"), "triton-pair": mhc_pair, "torch": mhc("torch"), "residual": residual}
        notes = {}  # variants not run: why
        row_notes = {"residual": "plain residual h + Linear(h), h [T, C]",
                     "triton-pair": "HyperConnection's fused read / write-back pair (one stream gradient)"}
        try:
            from liger_kernel.transformers.mhc import LigerMHC

            liger = LigerMHC(
                torch.nn.Linear(c, c, device=dev, dtype=dtype), hc=n, c=c, tmax=20,
                phi_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
                allow_fp32=dtype == torch.float32,
            ).to(dev)  # fmt: skip
            lparams = [x, *liger.parameters()]

            def liger_fn():
                torch.autograd.grad(liger(x), lparams, g_out)

            liger_fn()
            fns["liger"] = liger_fn
        except ImportError:
            notes["liger"] = "not installed"
        except Exception as e:
            notes["liger"] = f"ERROR {type(e).__name__}: {e}"
        if COMPILED_REF:
            try:
                ref_layer = _compiled_reference_layer()

                def ref_compiled():
                    out = ref_layer(x, phi, bias, alpha, lin.weight, lin.bias)
                    torch.autograd.grad(out, params, g_out)

                t0 = time.time()
                ref_compiled()  # compiles (once per dtype)
                fns["reference-compiled"] = ref_compiled
                row_notes["reference-compiled"] = (f"torch.compile(dynamic=True) of mhckit.reference's layer "
                                                   f"(first call {time.time() - t0:.0f} s)")
            except Exception as e:
                notes["reference-compiled"] = f"ERROR {type(e).__name__}: {e}"
                traceback.print_exc()
        else:
            notes["reference-compiled"] = "off (MHCKIT_BENCH_COMPILED_REF=0; off by default in the CPU smoke run)"
        for f in fns.values():
            f()  # compile / autotune outside the timed loop
        timing = bench(fns)
        for b, f in fns.items():
            med, p20, p80 = timing[b]
            res.add(
                **base, op="layer fwd+bwd", variant=b, ms_median=med, ms_p20=p20, ms_p80=p80,
                vs_torch=timing["torch"][0] / med, peak_extra_mib=peak_extra_mib(f), status="ok",
                note=row_notes.get(b, ""),
            )  # fmt: skip
        for b, why in notes.items():
            res.add(**base, op="layer fwd+bwd", variant=b, status="not run", note=why)
    except Exception as e:
        res.add(**base, op="layer fwd+bwd", status="ERROR", note=f"{type(e).__name__}: {e}")
        traceback.print_exc()


# ==================================================================================================
# Report
# ==================================================================================================
def write_markdown(res: Results, m: dict, path: Path) -> None:
    lines = [
        "# mhckit Triton backend: GPU check",
        "",
        f"GPU: {m['gpu']} | torch {m['torch']} (CUDA {m['cuda']}) | triton {m['triton']} | "
        f"commit {m['commit']} | {m['date_utc']} | liger_kernel: {m['liger_kernel']}",
        "",
        "Times: CUDA events, variants interleaved, median (p20-p80) over "
        f"{REPS} runs; `vs torch` = torch backend's median / this one's (>1: faster). "
        "Memory: peak allocated during one call beyond what was allocated before it.",
        "",
        "## Parity on the GPU",
        "",
        "| shape (tokens, n, C) | dtype | status | details |",
        "| --- | --- | --- | --- |",
    ]
    for r in res.rows:
        if r["section"] == "parity":
            lines.append(f"| {r['tokens']}, {r['n']}, {r['C']} | {r['dtype']} | {r['status']} | {r['note']} |")
    lines += [
        "",
        "## Timings and memory",
        "",
        "| dtype | C | op | variant | ms median (p20-p80) | vs torch | peak extra MiB | status | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res.rows:
        if r["section"] != "bench":
            continue
        ms = f"{r['ms_median']} ({r['ms_p20']}-{r['ms_p80']})" if r["ms_median"] != "" else ""
        lines.append(
            f"| {r['dtype']} | {r['C']} | {r['op']} | {r['variant']} | {ms} | {r['vs_torch']} | "
            f"{r['peak_extra_mib']} | {r['status']} | {r['note']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    m = meta()
    print("gpu_check:", json.dumps(m), flush=True)
    res = Results(out, {k: m[k] for k in ("gpu", "torch", "triton", "commit")})
    if not torch.cuda.is_available() and not CPU_SMOKE:
        res.add(section="setup", status="ERROR", note="no CUDA device")
    else:
        dev = torch.device("cpu" if CPU_SMOKE else "cuda")
        try:
            section_parity(res, dev)
        except Exception as e:
            res.add(section="parity", status="ERROR", note=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        for dtype in DTYPES:
            for c in WIDTHS:
                if elapsed() > BUDGET_S:
                    res.add(section="bench", dtype=str(dtype).split(".")[-1], C=c, status="skipped", note="time budget")
                    continue
                try:
                    section_shape(res, dev, dtype, c)
                except Exception as e:
                    res.add(section="bench", dtype=str(dtype), C=c, status="ERROR", note=f"{type(e).__name__}: {e}")
                    traceback.print_exc()
                gc.collect()
                if not CPU_SMOKE:
                    torch.cuda.empty_cache()
    m["elapsed_s"] = round(elapsed(), 1)
    write_markdown(res, m, out / "gpu_check.md")
    (out / "gpu_check.json").write_text(json.dumps({"meta": m, "rows": res.rows}, indent=1))

    bad = [r for r in res.rows if r["status"] in ("FAIL", "ERROR")]
    print("\n==================== gpu_check summary ====================")
    print(f"{m['gpu']} | torch {m['torch']} | triton {m['triton']} | commit {m['commit']} | {m['elapsed_s']} s")
    parity = [r for r in res.rows if r["section"] == "parity"]
    print(f"parity: {sum(r['status'] == 'pass' for r in parity)}/{len(parity)} pass")
    for r in res.rows:
        if r["section"] == "bench" and r["op"].startswith("layer") and r["ms_median"] != "":
            print(f"  layer fwd+bwd {r['dtype']:>8} C={r['C']}: {r['variant']:>8} {r['ms_median']:8.3f} ms "
                  f"(vs torch x{r['vs_torch']}), peak extra {r['peak_extra_mib']} MiB")
    for r in bad:
        print(f"  {r['status']}: {r['section']} {r['op']} {r['dtype']} C={r['C']} {r['variant']}: {r['note'][:300]}")
    print(f"results: {out}/gpu_check.csv, gpu_check.md, gpu_check.json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
