"""A short, real example: train tiny byte-level GPTs (residual vs mHC) and print gain diagnostics.

Runs on a laptop CPU in well under a minute. The text is CPython's own documentation topics
(``pydoc_data/topics.py``), which every Python installation has. The full comparison harness is
``mhckit compare`` (training issue); this is the smallest thing that exercises the library end
to end: build the stack, train a few steps, read ``h_res`` back and measure its composite gain.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydoc_data
import torch

from .config import MHCConfig
from .diagnostics import gain_report, record_coefficients
from .models import GPT, GPTConfig


def load_bytes() -> torch.Tensor:
    text = (Path(pydoc_data.__file__).parent / "topics.py").read_bytes()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        rows = torch.stack([data[i : i + seq + 1] for i in idx.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def train(variant: str, data: torch.Tensor, steps: int, seed: int) -> tuple[GPT, list[float], float]:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=64, hc=MHCConfig(variant=variant, n_streams=4))
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses, gen, t0 = [], torch.Generator().manual_seed(seed), time.perf_counter()
    for step, (x, y) in zip(range(steps), batches(data, 16, cfg.seq_len, gen)):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """``mhckit demo [--steps N] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="mhckit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per model (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: got {args.steps}; expected an int >= 1")
    run(steps=args.steps, seed=args.seed)
    return 0


def run(steps: int = 60, seed: int = 0) -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = load_bytes()
    print(f"mhckit demo: byte-level GPT (4 blocks, C=64, n=4) on {data.numel():,} bytes of pydoc topics, {steps} steps")
    results = {}
    for variant in ("residual", "mhc"):
        model, losses, secs = train(variant, data, steps, seed)
        head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"  {variant:8s} loss {head:.3f} -> {tail:.3f}  ({secs:.1f} s)")
        results[variant] = (model, losses)
    model = results["mhc"][0]
    x, _ = next(batches(data, 4, model.cfg.seq_len, torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad(), record_coefficients(model) as records:
        model(x)
    report = gain_report([r.h_res for r in records])
    print(f"  mHC composite gains over {len(records)} sublayers (paper Fig. 3b analogue; ideal 1):")
    for key in ("forward_gain", "backward_gain", "max_abs_log_colsum", "identity_distance"):
        vals = " ".join(f"{v:.3f}" for v in report[key].tolist())
        print(f"    {key:20s} {vals}")
    return {"report": report, "losses": {k: v[1] for k, v in results.items()}}
