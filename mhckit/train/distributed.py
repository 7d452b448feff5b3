"""Multi-process training under ``torchrun``: DDP or FSDP2 (``fully_shard``); gloo on CPU, nccl on GPU.

With a single process everything here is a no-op. Each rank draws rows ``rank::world_size`` of the
same global batch (see :class:`mhckit.train.data.BatchSampler`), so with the same seed a run on
``W`` processes sees exactly the batches of a single-process run, and its gradients are their
average over ranks (equal-sized shards: the global mean).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # "none", "ddp" or "fsdp"
    device: torch.device | None = None  # None: let the trainer choose


def setup(cfg) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if cfg.parallel in ("ddp", "fsdp"):
            raise ValueError(f"parallel: got {cfg.parallel!r} in a single process; launch with torchrun --nproc_per_node=N")
        return DistInfo()
    if cfg.parallel == "none":
        raise ValueError(f"parallel: got 'none' under torchrun with WORLD_SIZE={world}; use 'auto', 'ddp' or 'fsdp'")
    mode = "ddp" if cfg.parallel == "auto" else cfg.parallel
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, mode, device)


def wrap(model: nn.Module, cfg, info: DistInfo) -> nn.Module:
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if info.device is not None and info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options())
    return unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=_options())
    return opt.state_dict()


def load_model_state(model: nn.Module, path, ckpt) -> None:
    if not _is_fsdp(model):
        ckpt.load_weights(path, unwrap(model))
        return
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = load_file(str(path / ckpt.FILES[0]))
    if "head.weight" not in weights and getattr(model.cfg, "tie_embeddings", False):
        weights["head.weight"] = weights["embed.weight"]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(state)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> None:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> None:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size


def teardown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
