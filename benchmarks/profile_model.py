"""Where a GPT training step spends its time: top kernels / ops by self time, per variant.

    python -m benchmarks.profile_model [--preset gpt124m] [--variants residual,mhc] [--rows 25]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_model import PRESETS, VARIANTS, _ops_of, build, step_fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt124m", choices=sorted(PRESETS))
    p.add_argument("--variants", default="residual,mhc")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    preset, dev = PRESETS[args.preset], args.device
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq_len"] + 1), device=dev)
    cuda = dev.startswith("cuda")
    for name in args.variants.split(","):
        model, opt = build(preset, VARIANTS[name], dev, "auto")
        step = step_fn(model, opt, tokens, dev, **_ops_of(VARIANTS[name]))  # the variant's own ops
        for _ in range(3):
            step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                step()
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"==== {name} ({args.preset}, 2 steps)")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        del model, opt
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
