"""The trainer: AdamW with parameter groups, warmup + cosine / WSD, clipping, evaluation,
diagnostics, JSONL metrics, atomic checkpoints with exact resume, and DDP / FSDP2 under torchrun.

``train(cfg)`` runs one :class:`~mhckit.train.config.TrainConfig` and returns a summary dict.
A run killed at any moment and restarted with ``resume=True`` continues from its last complete
checkpoint and ends with the same weights and validation loss as an uninterrupted run (same
device, same seed): the model, the optimiser, the data sampler and the RNG are all restored and
the metrics log is truncated to the checkpoint's step.

Non-finite steps: a step whose loss or gradient norm is NaN or Inf (on any rank: the decision is
one all-reduce, so every rank agrees) applies no update: the weights, the AdamW state and the
step counter (hence the learning-rate schedule) stay as they were, the batch is consumed, and a
``kind="skip"`` record and a log line say so. ``max_bad_steps`` such steps in a row stop the run
with :class:`NonFiniteTrainingError`; no checkpoint is written then, so the last one on disk is
the last good state. A checkpoint is never written from non-finite weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.gpt import GPT
from . import alloc
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import TrainConfig
from .data import TokenData, load_token_data
from .monitor import collect
from .runinfo import run_info

NO_DECAY_SUFFIXES = ("static_res",)


class NonFiniteTrainingError(RuntimeError):
    """The run stopped: too many non-finite steps in a row, or non-finite weights at a checkpoint."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (dim >= 2); not norms, biases, gates or the static HC parameters (HC paper)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        static = name.endswith(NO_DECAY_SUFFIXES)
        (decay if p.dim() >= 2 and not static else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(0.8 * cfg.steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return cfg.lr + (floor - cfg.lr) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: got 'cuda' but torch.cuda.is_available() is False; use --device=cpu")
    return torch.device(cfg.device)


def autocast_context(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _record_step(line: str) -> float:
    """The step of one JSONL record; ``inf`` (dropped on resume) for a blank line or one torn by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Append-only JSONL, truncated on resume to the checkpoint's step (nothing logged twice)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _record_step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")  # a kill now leaves the old log whole
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, cfg: TrainConfig, data: TokenData | None = None, log=print):
        self.cfg = cfg
        self.dist = dist_utils.setup(cfg)
        self.is_main = self.dist.rank == 0
        if cfg.batch_size % self.dist.world_size:  # before any data is read or model built
            raise ValueError(f"batch_size: got {cfg.batch_size}; expected a multiple of world_size="
                             f"{self.dist.world_size} (the global batch is split evenly over the processes)")
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.device = self.dist.device or resolve_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.heap = "left alone"  # the CPU heap's settings, see mhckit/train/alloc.py
        if self.device.type == "cpu" and cfg.keep_freed_memory:
            self.heap = alloc.keep_freed_memory()
        self.data = data or load_token_data(cfg.data, cfg.tokenizer, cfg.cache_dir, cfg.val_fraction)
        vocab = self.data.tokenizer.vocab_size
        if cfg.model.vocab_size != vocab:
            cfg.model = replace(cfg.model, vocab_size=vocab)  # the tokenizer fixes the vocabulary
        self.run_dir = Path(cfg.out_dir) / cfg.name
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.raw_model = self.model
        self.model = dist_utils.wrap(self.model, cfg, self.dist)
        # fused AdamW: one kernel over all tensors instead of ~10 ops per tensor (on the CPU, 2.7 ms ->
        # 0.4 ms per step for the default mHC compare model, 1.5 -> 0.4 ms for the residual one);
        # FSDP2's sharded (DTensor) parameters keep the per-tensor loop
        self.opt = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
            fused=self.dist.mode != "fsdp",
        )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        seq = cfg.model.seq_len
        self.sampler = self.data.sampler(
            cfg.batch_size, seq, cfg.seed, device=self.device, rank=self.dist.rank, world_size=self.dist.world_size
        )
        probe = next(iter(self.data.eval_batches(max(1, min(4, cfg.batch_size)), seq, max_batches=1, device=self.device)))
        self.probe = probe[0]
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main)
        self.step = 0
        self.loss_ema = None  # running mean of the train loss, for spike_ratio (checkpointed)

    # ------------------------------------------------------------------ checkpoints
    def _start(self) -> None:
        cfg = self.cfg
        existing = ckpt.complete_checkpoints(self.run_dir)
        if existing and not cfg.resume:
            raise ValueError(
                f"name: run directory {self.run_dir} already has checkpoints; pass --resume=true to continue it "
                "or choose another --name"
            )
        found = ckpt.find_checkpoint(self.run_dir, self.log) if cfg.resume else None
        if found is None:
            if cfg.resume:
                self.log(f"resume: no complete checkpoint in {self.run_dir}; starting from step 0")
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            dist_utils.barrier(self.dist)
            self._write_config()
            return
        dist_utils.load_model_state(self.model, found.path, ckpt)
        state = ckpt.load_state(found.path)
        dist_utils.load_optimizer_state(self.model, self.opt, state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in state:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = found.step
        self.loss_ema = state.get("loss_ema")
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {found.path} (step {self.step})")

    def _write_config(self) -> None:
        if self.is_main:
            info = dict(run_info(), config=asdict(self.cfg), world_size=self.dist.world_size)
            (self.run_dir / "config.json").write_text(json.dumps(info, indent=1, sort_keys=True))

    def _nonfinite_weights(self) -> int:
        """Non-finite values in the weights, summed over ranks (each checks its own shards)."""
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.raw_model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard (DTensor)
            count += (~torch.isfinite(local.detach())).sum()
        dist_utils.all_reduce_sum(count, self.dist)
        return int(count.item())

    def save(self) -> None:
        bad = self._nonfinite_weights()
        if bad:  # every rank sees the same sum, so every rank raises
            raise NonFiniteTrainingError(
                f"save: the weights at step {self.step} have {bad} non-finite values; not writing a checkpoint "
                f"(the last good one is {self._last_checkpoint()}); resume from it with --resume=true, e.g. with "
                "a lower --lr"
            )
        model_state = dist_utils.full_model_state(self.model)
        opt_state = dist_utils.full_optimizer_state(self.model, self.opt)
        if self.is_main:
            state = {
                "optimizer": opt_state,
                "sampler": self.sampler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "loss_ema": self.loss_ema,
            }
            if torch.cuda.is_available():
                state["rng_cuda"] = torch.cuda.get_rng_state_all()
            meta = {"config": asdict(self.cfg), **run_info()}
            ckpt.save_checkpoint(self.run_dir, self.step, model_state, state, meta, keep=self.cfg.keep_ckpts)
        dist_utils.barrier(self.dist)

    def _last_checkpoint(self) -> str:
        done = ckpt.complete_checkpoints(self.run_dir)
        return str(done[-1]) if done else "none (no checkpoint was written)"

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        cfg = self.cfg
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = self.data.eval_batches(
            cfg.batch_size, cfg.model.seq_len, max_batches=cfg.eval_batches, device=self.device,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        for x, y in batches:
            if x.numel() == 0:
                continue
            with autocast_context(cfg, self.device):
                logits = self.forward(x)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=self.device)])
        dist_utils.all_reduce_sum(total, self.dist)
        self.model.train()
        return (total[0] / total[1]).item()

    # ------------------------------------------------------------------ the loop
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, bool]:
        """One forward / backward / update; returns ``(mean loss over ranks, grad norm, skipped)``.

        The update is skipped (weights and optimiser state untouched) when the loss on any rank or
        the gradient norm is not finite: one all-reduce carries the loss sum and the count of
        ranks that saw a bad value, so every rank takes the same decision.
        """
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        with autocast_context(cfg, self.device):
            _, loss = self.forward(x, y)
        loss.backward()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        loss_val = loss.detach()
        bad = (~torch.isfinite(loss_val)).to(loss_val.dtype) + (0.0 if math.isfinite(gnorm) else 1.0)
        stats = torch.stack([loss_val, bad])  # [loss, ranks with a non-finite loss or grad norm]
        dist_utils.all_reduce_sum(stats, self.dist)
        skip = bool(stats[1].item() > 0)
        if not skip:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss_mean = stats[0] / self.dist.world_size if self.dist.world_size > 1 else stats[0]
        return loss_mean.item(), gnorm, skip

    def _skipped(self, loss: float, gnorm: float, in_a_row: int) -> NonFiniteTrainingError | None:
        """Log a skipped step; at ``max_bad_steps`` in a row, the error that stops the run."""
        cfg = self.cfg
        step = self.step + 1  # the step that was attempted (self.step counts applied updates)
        what = [name for name, v in (("loss", loss), ("grad_norm", gnorm)) if not math.isfinite(v)] or ["loss"]
        self.metrics.write(kind="skip", step=step, loss=loss if math.isfinite(loss) else None,
                           grad_norm=gnorm if math.isfinite(gnorm) else None, nonfinite=what, in_a_row=in_a_row)
        self.log(f"step {step}: non-finite {' and '.join(what)} (loss={loss}, grad_norm={gnorm}); skipped the "
                 f"optimizer step ({in_a_row} in a row, max_bad_steps={cfg.max_bad_steps})")
        if in_a_row < cfg.max_bad_steps:
            return None
        self.metrics.write(kind="stop", step=step, reason="max_bad_steps", in_a_row=in_a_row)
        return NonFiniteTrainingError(
            f"max_bad_steps: {in_a_row} steps in a row had a non-finite loss or gradient norm (at step {step}, "
            f"after {self.step} applied steps); stopping. No checkpoint was written from this state; the last "
            f"good one is {self._last_checkpoint()}. Resume from it with --resume=true after lowering --lr, "
            "raising --warmup_steps or enabling --grad_clip, or raise --max_bad_steps"
        )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start()
        tokens_per_step = cfg.batch_size * cfg.model.seq_len
        bar = _progress(cfg, self.step, self.is_main)
        t_start, steps_timed, val_loss = time.perf_counter(), 0, None
        bad_in_a_row = 0
        while self.step < cfg.steps:
            x, y = next(self.sampler)
            t0 = time.perf_counter()
            loss, gnorm, skipped = self.train_step(x, y)
            dt = time.perf_counter() - t0
            if skipped:  # no update: the step counter, the schedule and the loss mean stay
                bad_in_a_row += 1
                stop = self._skipped(loss, gnorm, bad_in_a_row)
                if stop is not None:
                    if bar is not None:
                        bar.close()
                    raise stop
                continue
            bad_in_a_row = 0
            self.step += 1
            steps_timed += 1
            ema = self.loss_ema
            spike = loss / ema if ema is not None else 1.0
            self.loss_ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.metrics.write(kind="train", step=self.step, loss=loss, grad_norm=gnorm, lr=lr_at(self.step - 1, cfg),
                                   tokens_per_s=tokens_per_step / dt, spike_ratio=spike)
            last = self.step == cfg.steps
            if self.step % cfg.eval_every == 0 or last:
                val_loss = self.evaluate()
                self.metrics.write(kind="eval", step=self.step, val_loss=val_loss)
            if self.step % cfg.diag_every == 0 or last:
                self.metrics.write(kind="diag", step=self.step, **collect(self.raw_model, self.probe))
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                                tok_s=f"{tokens_per_step / dt:,.0f}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t_start
        if val_loss is None:  # resumed at the end: evaluate what we have
            val_loss = self.evaluate()
        summary = {
            "name": cfg.name, "variant": cfg.model.hc.variant, "seed": cfg.seed, "steps": cfg.steps,
            "val_loss": val_loss, "params": sum(p.numel() for p in self.raw_model.parameters()),
            "tokens_per_s": tokens_per_step * steps_timed / elapsed if steps_timed else None,
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        if self.dist.world_size > 1:
            # DDP's reducer and FSDP's state hold the process group through reference cycles: free
            # them before destroying it, or gloo may abort ("terminate called without an active
            # exception") or hang when they are collected at exit.
            self.model = self.forward = self.raw_model = self.opt = None
        dist_utils.teardown(self.dist)


def _progress(cfg: TrainConfig, start: int, enabled: bool):
    if not (cfg.progress and enabled):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig, data: TokenData | None = None, log=print) -> dict[str, Any]:
    trainer = Trainer(cfg, data, log)
    try:
        return trainer.run()
    finally:
        trainer.close()
