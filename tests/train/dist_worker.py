"""Worker launched by ``torchrun`` from tests/train/test_distributed.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/dist_worker.py \
        PARALLEL DATA OUT_DIR

``PARALLEL`` is ``ddp`` or ``fsdp``. Three trainers, one after another, in one launch (a launch
costs seconds), all built from :func:`tiny_config`, which the test imports to do the same in one
process:

1. ``OUT_DIR/grads.pt``: one forward + backward on the sampler's first global batch, no optimiser
   step; rank 0 saves the all-reduced mean loss and the full, rank-averaged gradients by name.
2. run ``OUT_DIR/run``: ``Trainer.run()`` for 4 steps (checkpoint at the end);
   ``OUT_DIR/summary4.json``.
3. the same run resumed under the same parallelism with ``steps=6``: loads the model, optimiser and
   sampler state that step 2 saved; ``OUT_DIR/summary6.json``.

With a fourth argument ``compiled-recompute`` only the 4-step run, its model compiled
(``compile=True``) with stream recomputation (``recompute=-1``): ``OUT_DIR/summary4.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mhckit.config import MHCConfig
from mhckit.models.gpt import GPTConfig
from mhckit.train import distributed as dist_utils
from mhckit.train.config import TrainConfig
from mhckit.train.trainer import Trainer

BATCH = 4  # the global batch: 2 rows per rank with 2 processes


def tiny_config(parallel: str, data: str, out_dir: str, name: str, steps: int = 4, recompute: int = 0,
                **kw) -> TrainConfig:
    """The model every distributed test uses: 2 blocks, 4 mHC streams, width 32, context 32."""
    return TrainConfig(
        name=name, out_dir=out_dir, data=data, seed=0, steps=steps, batch_size=BATCH, lr=1e-2, warmup_steps=1,
        eval_every=steps, eval_batches=2, diag_every=steps, log_every=1, ckpt_every=0, keep_ckpts=2,
        device="cpu", precision="float32", parallel=parallel, threads=1, progress=False,
        model=GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=32, recompute=recompute,
                        hc=MHCConfig(variant="mhc", n_streams=4)),
        **kw,
    )


def named_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (names of the unwrapped model; shared parameters once).

    DDP has already averaged them over ranks during backward. Under FSDP2 they are sharded
    DTensors (reduce-scattered, so also averaged): ``full_tensor()`` gathers them, a collective
    that every rank runs in the same order.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in dist_utils.unwrap(trainer.model).named_parameters():
        g = p.grad
        assert g is not None, f"{name}: no gradient"
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name] = g.detach().cpu().clone()
    return out


def first_step_grads(trainer: Trainer) -> dict:
    """Forward + backward on the sampler's first batch (this rank's rows); no optimiser step."""
    x, y = next(trainer.sampler)
    _, loss = trainer.forward(x, y)
    loss.backward()
    loss = loss.detach().clone()
    dist_utils.all_reduce_mean(loss, trainer.dist)
    return {"loss": loss.item(), "grads": named_grads(trainer), "rows": x.shape[0]}


def main(argv: list[str]) -> int:
    parallel, data, out_dir, *mode = argv
    out = Path(out_dir)
    if mode == ["compiled-recompute"]:
        trainer = Trainer(tiny_config(parallel, data, out_dir, name="run", compile=True, recompute=-1))
        try:
            summary = trainer.run()
            if trainer.is_main:
                (out / "summary4.json").write_text(json.dumps(dict(summary, world_size=trainer.dist.world_size)))
        finally:
            trainer.close()
        return 0
    trainer = Trainer(tiny_config(parallel, data, out_dir, name="grads"))
    try:
        result = first_step_grads(trainer)
        if trainer.is_main:
            torch.save(dict(result, world_size=trainer.dist.world_size), out / "grads.pt")
        for steps, resume in ((4, False), (6, True)):
            trainer = None  # drop the previous trainer (the process group stays)
            trainer = Trainer(tiny_config(parallel, data, out_dir, name="run", steps=steps, resume=resume))
            summary = trainer.run()
            if trainer.is_main:
                summary["world_size"] = trainer.dist.world_size
                (out / f"summary{steps}.json").write_text(json.dumps(summary))
    finally:
        if trainer is not None:
            trainer.close()  # collects the dropped trainers too, then destroys the process group
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
