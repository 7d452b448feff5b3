"""Model-level benchmark: GPT training step, tokens/s and memory, residual vs mHC (+ recomputation).

    python -m benchmarks.bench_model [--preset default|gpt124m] [--steps 20] [--variants ...] [--compile]
                                     [--dtype float32|bfloat16]

Each variant is a full GPT training step (forward, backward, AdamW) on random tokens; the
variants are stepped interleaved (A B C A B C ...) and the medians of the step times give
tokens/s and paired ratios against the residual. Memory: on CUDA the peak allocated bytes of a
step (``torch.cuda.max_memory_allocated``); on the CPU, which has no allocator statistics, the
estimate of :func:`mhckit.train.memory.estimate_training_memory` (parameters + gradients + AdamW
state + the distinct storages autograd saves for backward), the same number `mhckit compare` reports.

``--dtype bfloat16`` casts every model (parameters, activations, streams; AdamW on bf16 parameters):
pure-bf16 training, mHC's coefficients still in fp32. ``--compile`` runs every variant through
``torch.compile`` (default variants residual, mhc, mhc+recompute, mhc-traced; ``first_step_s`` records the
compiling first step, which depends on the inductor cache; the CPU memory estimate is of the compiled
step, whose graph decides what is saved: recomputation is then :func:`mhckit.recompute.sequential`'s
checkpoint regions). On the CPU
mHC's ops are then custom ops that call the C kernels; ``mhc-traced`` instead lets dynamo trace mHC's
PyTorch ops (what ``torch.compile`` did before the custom ops), for comparison. ``mhc-separate`` (default on
CUDA) runs mHC's sublayers as separate ops instead of HyperConnection's fused read / write-back pair
(:func:`mhckit.ops.carry.separate_ops`): what the pair saves, measured in the same run. ``mhc-lite`` /
``mhc-lite-separate`` and ``hc`` / ``hc-separate`` do the same for mHC-lite (on the CPU its pair runs the
permutation mixture in the C kernels) and HC (on the CPU its dynamic coefficients and read in one C call each
way, the write-back's stream gradient joining their backward).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import Result, command_line, median_ci, save_results
from mhckit import MHCConfig
from mhckit.models import GPT, GPTConfig
from mhckit.ops import carry, cpu
from mhckit.ops.cpu import _pair
from mhckit.train.alloc import keep_freed_memory
from mhckit.train.memory import estimate_training_memory

RESULTS = Path(__file__).parent / "results"
PRESETS = {
    # the default `mhckit compare` model (CPU)
    "default": dict(n_layer=6, d_model=64, n_head=4, seq_len=64, batch=16, vocab=256),
    # the same model 4x wider (C = 256): how the CPU overhead of mHC falls with the width
    "wide": dict(n_layer=6, d_model=256, n_head=4, seq_len=64, batch=16, vocab=256),
    # GPT-2 small shape
    "gpt124m": dict(n_layer=12, d_model=768, n_head=12, seq_len=1024, batch=16, vocab=50304),
}
VARIANTS = {
    "residual": dict(variant="residual", recompute=0),
    "mhc": dict(variant="mhc", recompute=0),
    "mhc+recompute": dict(variant="mhc", recompute=-1),
    "mhc-torch-ops": dict(variant="mhc", recompute=0, cpu_kernels=False),  # CPU: PyTorch ops, no compiled kernels
    "mhc-traced": dict(variant="mhc", recompute=0, traced=True),  # --compile: dynamo traces the PyTorch ops
    # mHC as separate ops (read, write-back, autograd adding their stream gradients) instead of the fused pair
    "mhc-separate": dict(variant="mhc", recompute=0, separate=True),
    # Hyper-Connections (arXiv 2409.19606), dynamic: for the cost of the other variant the library has
    "hc": dict(variant="hc", recompute=0),
    # HC on the separate ops (coefficient ops, read, write-back), as before its C pair took them (CPU)
    "hc-separate": dict(variant="hc", recompute=0, separate=True),
    # CPU: mHC on the kernels built for AVX2 only (mhckit.ops.cpu.use_isa), next to the default build
    "mhc-avx2": dict(variant="mhc", recompute=0, isa="avx2"),
    # mHC-lite (arXiv 2601.05732): on the fused pair with the kernels' permutation tail (CPU, n <= 4), and
    # as separate ops (logits, mixture, read, write-back: what it ran before the pair took it)
    "mhc-lite": dict(variant="mhc-lite", recompute=0),
    "mhc-lite-separate": dict(variant="mhc-lite", recompute=0, separate=True),
    # the identity variant (h_res = I, the iHC ablation): on the fused pair (CPU kernels, eager), and as
    # separate ops (logits, read, x + h_post y: what it ran before the pair took it)
    "identity": dict(variant="identity", recompute=0),
    "identity-separate": dict(variant="identity", recompute=0, separate=True),
    # static HC (no input-dependent terms): its read on the pair (ReadCarryFunction / carry_pre_read), and
    # as separate ops
    "hc-static": dict(variant="hc", recompute=0, hc_dynamic=False),
    "hc-static-separate": dict(variant="hc", recompute=0, hc_dynamic=False, separate=True),
    # mHC with its coefficient backward writing dx into a fresh buffer instead of over the write-back's
    # output gradient (mhckit.ops.carry.REUSE_GRADIENT_BUFFER = False: what it did before)
    "mhc-fresh-grad": dict(variant="mhc", recompute=0, reuse=False),
    # mHC on the pair's Python autograd Functions (mhckit.ops.carry) instead of the C++ ones
    # (mhckit/ops/cpu/_pair.py, the default where they build): same kernels, same results bit for bit
    "mhc-python-pair": dict(variant="mhc", recompute=0, cpp_pair=False),
}


def _never(*tensors) -> bool:
    return False


@contextlib.contextmanager
def _traced_ops(on: bool):
    """mHC's PyTorch ops traced instead of mhckit's custom ops (CPU). Around EVERY step of the variant:
    dynamo guards on the function it traced through and would recompile without it."""
    import mhckit.functional as F

    real = F._compile_cpu
    if on:
        F._compile_cpu = _never
    try:
        yield
    finally:
        F._compile_cpu = real


def build(preset: dict, spec: dict, device: str, backend: str,
          dtype: torch.dtype = torch.float32) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=preset["vocab"], seq_len=preset["seq_len"], n_layer=preset["n_layer"],
                    n_head=preset["n_head"], d_model=preset["d_model"], recompute=spec["recompute"],
                    hc=MHCConfig(variant=spec["variant"], backend=backend, hc_dynamic=spec.get("hc_dynamic", True)))
    model = GPT(cfg).to(device, dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer


@contextlib.contextmanager
def variant_ops(cpu_kernels: bool = True, traced: bool = False, separate: bool = False, isa: str | None = None,
                reuse: bool = True, cpp_pair: bool = True):
    """The ops a variant runs on (around its forward and backward, and its memory estimate)."""
    with (contextlib.nullcontext() if cpu_kernels else cpu.disabled(), _traced_ops(traced),
          carry.separate_ops() if separate else contextlib.nullcontext(),
          cpu.use_isa(isa) if isa else contextlib.nullcontext(), carry.reuse_gradient_buffer(reuse),
          contextlib.nullcontext() if cpp_pair else _pair.use_cpp_pair(False)):
        yield


def _ops_of(spec: dict) -> dict:
    return dict(cpu_kernels=spec.get("cpu_kernels", True), traced=spec.get("traced", False),
                separate=spec.get("separate", False), isa=spec.get("isa"), reuse=spec.get("reuse", True),
                cpp_pair=spec.get("cpp_pair", True))


def step_fn(model, opt, tokens, device, cpu_kernels: bool = True, traced: bool = False, separate: bool = False,
            isa: str | None = None, reuse: bool = True, cpp_pair: bool = True):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def step():
        with variant_ops(cpu_kernels, traced, separate, isa, reuse, cpp_pair):  # fwd and bwd
            with autocast:
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--variants", default=None, help="default: residual,mhc,mhc+recompute (+mhc-torch-ops on CPU, "
                   "mhc-separate on CUDA); with --compile residual,mhc,mhc+recompute (+mhc-traced on CPU)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the whole model")
    p.add_argument("--default-heap", action="store_true",
                   help="leave glibc's heap thresholds alone (the trainer keeps freed memory: mhckit/train/alloc.py)")
    args = p.parse_args(argv)
    preset, dev = PRESETS[args.preset], args.device
    heap = "left alone"
    if not dev.startswith("cuda") and not args.default_heap:  # as the trainer sets it, for every variant
        heap = keep_freed_memory()
    print("heap:", heap)
    cpu_dev = not dev.startswith("cuda")
    default = (["residual", "mhc", "mhc+recompute"] + ["mhc-traced"] * cpu_dev if args.compile else
               ["residual", "mhc", "mhc+recompute"] + (["mhc-torch-ops"] if cpu_dev else ["mhc-separate"]))
    names = args.variants.split(",") if args.variants else default
    for n in names:
        if n not in VARIANTS or (VARIANTS[n].get("traced") and not args.compile):
            raise SystemExit(f"--variants: got {n!r}; expected some of {sorted(VARIANTS)} (mhc-traced with --compile)")
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq_len"] + 1), device=dev)
    dtype = getattr(torch, args.dtype)
    runs = {n: build(preset, VARIANTS[n], dev, args.backend, dtype) for n in names}
    stepped = {n: torch.compile(m) if args.compile else m for n, (m, _) in runs.items()}  # what a step calls
    steps = {n: step_fn(stepped[n], o, tokens, dev, **_ops_of(VARIANTS[n])) for n, (m, o) in runs.items()}
    first_step = {}
    for n in names:  # the first step compiles (with --compile)
        t0 = time.perf_counter()
        steps[n]()
        first_step[n] = time.perf_counter() - t0
    memory = {}
    for n in names:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps[n]()
            torch.cuda.synchronize()
            memory[n] = torch.cuda.max_memory_allocated()
        else:
            with variant_ops(**_ops_of(VARIANTS[n])):  # what the variant's steps save, on its own ops
                memory[n] = estimate_training_memory(stepped[n], tokens[:, :-1], tokens[:, 1:])["total_bytes"]
        for _ in range(args.warmup):
            steps[n]()
    times = {n: [] for n in names}
    for r in range(args.steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[n]()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    ntok = preset["batch"] * preset["seq_len"]
    base = names[0]
    results = []
    for n in names:
        ratios = sorted(b / t for t, b in zip(times[n], times[base]))  # throughput ratio vs baseline
        med = statistics.median(times[n])
        params = {"preset": args.preset, "variant": n, "tokens_per_s": round(ntok / med),
                  "memory_MB": round(memory[n] / 2**20, 1), "memory_ratio": round(memory[n] / memory[base], 3),
                  "memory_kind": "cuda peak allocated" if dev.startswith("cuda") else "params+grads+adam+saved",
                  "compiled": args.compile, "first_step_s": round(first_step[n], 1), "dtype": args.dtype,
                  "ratio_ci95": "%.3f-%.3f" % median_ci(ratios)}
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else (ratios[0], ratios[-1])
        results.append(Result(n, 1e3 * med, statistics.median(ratios), (q[0], q[-1]), args.steps, params))
        print(f"{n:15s} {1e3 * med:9.1f} ms/step  {ntok / med:10,.0f} tok/s  throughput x{statistics.median(ratios):.3f} "
              f"(95% CI {params['ratio_ci95']}) vs {base}  memory {memory[n] / 2**20:8.1f} MB (x{memory[n] / memory[base]:.2f})")
    suffix = ("_compiled" if args.compile else "") + ("" if dtype == torch.float32 else f"_{args.dtype}")
    stem = Path(args.out) if args.out else RESULTS / f"model_{args.preset}_{dev.split(':')[0]}{suffix}"
    save_results(results, stem, command_line(__spec__ and __spec__.name, argv),
                 f"  (ratio column = throughput relative to {base})", heap=heap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
