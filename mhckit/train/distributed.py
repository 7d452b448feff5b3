"""Multi-process training under ``torchrun``: DDP or FSDP2 (``fully_shard``); gloo on CPU, nccl on GPU.

With a single process everything here is a no-op. Each rank draws rows ``rank::world_size`` of the
same global batch (see :class:`mhckit.train.data.BatchSampler`), so with the same seed a run on
``W`` processes sees exactly the batches of a single-process run, and its gradients are their
average over ranks (equal-sized shards: the global mean).
"""

from __future__ import annotations

import gc
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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for every parameter registered under a second name (tied weights, e.g.
    ``head.weight -> embed.weight``), with the names of the unwrapped model."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) model state dict, on rank 0 (other ranks: ``{}`` under FSDP).

    Tied weights are stored once, under their first name, whatever the parallelism: a plain or
    DDP state dict shares their storage (the checkpoint writer keeps one copy), while FSDP's
    gathered state dict has a separate copy per name, so the aliases are dropped here.
    """
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options())
        for alias in tied_aliases(model):
            state.pop(alias, None)
        return state
    return unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimiser state dict keyed by parameter name (``"embed.weight"``, not an index
    and never with DDP's ``module.`` prefix), on rank 0: the same layout for a single process,
    DDP and FSDP, so a checkpoint written under one resumes under any other."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options())


def load_model_state(model: nn.Module, path, ckpt) -> None:
    if not _is_fsdp(model):
        ckpt.load_weights(path, unwrap(model))
        return
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = load_file(str(path / ckpt.FILES[0]))
    for alias, name in tied_aliases(model).items():  # FSDP wants every name, tied ones included
        if alias not in weights and name in weights:
            weights[alias] = weights[name]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimiser state dict (every rank passes the whole of it).

    Name-keyed (what :func:`full_optimizer_state` writes) under any parallelism; a plain
    ``Optimizer.state_dict()`` (integer keys, as older checkpoints of this trainer stored outside
    FSDP) only without FSDP.
    """
    named = all(isinstance(k, str) for g in state["param_groups"] for k in g["params"])
    if not named:
        if _is_fsdp(model):
            raise ValueError("optimizer state: keyed by parameter index, which FSDP cannot load; "
                             "resume it without FSDP")
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    for group in opt.param_groups:  # its flatten / unflatten turns tuples (betas) into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)


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
    """Destroy the process group once nothing holds it: drop the wrapped model first (see
    ``Trainer.close``); the collection here frees the reference cycles of DDP / FSDP."""
    if info.world_size > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
