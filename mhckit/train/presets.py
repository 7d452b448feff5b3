"""Named configurations ("config is code"): each preset is a dict of ``--key=value`` overrides.

``default`` is sized so that ``mhckit compare`` (4 variants x 3 seeds) finishes in a few minutes on
an idle 2-core CPU (measured at commit 77b0bb2: 182 s; 262 s before the compiled CPU kernels); the GPU
presets are for real comparisons.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    # small byte-level GPT for CPU: 6 blocks (12 hyper-connection sublayers), C=64, n=4. On the idle 2-core
    # dev CPU (torch's default 2 threads, commit 77b0bb2) one run takes residual ~13 s, hc ~16 s, mhc ~17 s,
    # mhc-lite ~15 s, so `mhckit compare` (4 variants x 3 seeds x 300 steps, plus evaluation and report)
    # takes ~3 minutes (182 s).
    # A busy machine is much slower: 2 seeds took 1134 s at load average ~4.
    "default": {
        "steps": 300, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "eval_every": 25, "eval_batches": 8,
        "diag_every": 25, "log_every": 5, "ckpt_every": 100, "model.n_layer": 6, "model.d_model": 64,
        "model.n_head": 4, "model.seq_len": 64,
    },
    # deeper, narrower, high learning rate, no clipping: where unconstrained HC's composite gain can run away
    "stress": {
        "steps": 200, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "grad_clip": 0.0, "weight_decay": 0.0,
        "eval_every": 50, "eval_batches": 4, "diag_every": 10, "log_every": 5, "ckpt_every": 0,
        "model.n_layer": 12, "model.d_model": 32, "model.n_head": 2, "model.seq_len": 32,
    },
    # one GPU, minutes: a 6-layer C=384 byte-level model
    "gpu-small": {
        "steps": 2000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "eval_every": 250, "eval_batches": 20,
        "diag_every": 100, "log_every": 20, "ckpt_every": 500, "model.n_layer": 6, "model.d_model": 384,
        "model.n_head": 6, "model.seq_len": 256,
    },
    # GPT-2 small shape (124M-class with the GPT-2 tokenizer)
    "gpu-124m": {
        "steps": 5000, "batch_size": 64, "lr": 6e-4, "warmup_steps": 200, "eval_every": 500, "eval_batches": 20,
        "diag_every": 250, "log_every": 20, "ckpt_every": 1000, "tokenizer": "gpt2", "model.n_layer": 12,
        "model.d_model": 768, "model.n_head": 12, "model.seq_len": 1024,
    },
}


def preset_overrides(name: str) -> dict[str, object]:
    if name not in PRESETS:
        raise ValueError(f"--preset: got {name!r}; expected one of " + ", ".join(map(repr, PRESETS)))
    return dict(PRESETS[name])
