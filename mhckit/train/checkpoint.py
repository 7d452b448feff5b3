"""Checkpoints that survive being killed at any moment.

Layout of ``<run>/checkpoints/step_00000100/``:
    model.safetensors   weights (safetensors: no pickle, tied weights handled)
    state.pt            optimiser, RNG and data-sampler state (loaded with ``weights_only=True``)
    meta.json           step, config, metrics summary and the sha256 of the two files above

A checkpoint is written into ``step_XXXXXXXX.tmp/``, flushed, and renamed into place, so a
directory without the ``.tmp`` suffix is always complete; ``<run>/checkpoints/LATEST`` (also
replaced atomically) names the newest one. The loader verifies the checksums (``meta.json``
carries its own, ``meta_sha256``, and must name the step of its directory) and falls back to the
previous complete checkpoint, saying which file was bad. Nothing is unpickled: weights are
safetensors and ``state.pt`` is read with ``torch.load(weights_only=True)``.

Fault injection (tests only): ``MHCKIT_FAULT_INJECT=checkpoint:<point>:<step>`` makes the process
SIGKILL itself at ``<point>`` of the save of ``<step>``; the points, in order, are listed in
:data:`FAULT_POINTS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "state.pt")
META = "meta.json"
FAULT_ENV = "MHCKIT_FAULT_INJECT"
FAULT_POINTS = (
    "weights",  # model.safetensors written into step_X.tmp/, state.pt not yet
    "state",  # both files written, meta.json not yet
    "meta",  # inside meta.json's atomic write: meta.json.tmp written, not yet renamed
    "publish",  # step_X.tmp/ complete, not yet renamed to step_X/
    "latest",  # step_X/ published, LATEST still names the previous checkpoint
    "prune",  # LATEST updated, older checkpoints not yet pruned
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated or corrupted)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str, step: int) -> None:
    """SIGKILL this process here if ``MHCKIT_FAULT_INJECT`` asks for it (deterministic kill tests)."""
    if os.environ.get(FAULT_ENV) == f"checkpoint:{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, data: bytes, before_replace=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its own digest, in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; returns its directory."""
    from safetensors.torch import save_file

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = _dedupe_shared(model_state)
    save_file(weights, str(tmp / FILES[0]))
    _fault("weights", step)
    torch.save(state, tmp / FILES[1])
    for name in FILES:
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    _fault("state", step)
    meta = dict(meta, step=step, sha256={name: _sha256(tmp / name) for name in FILES})
    meta["meta_sha256"] = _meta_digest(meta)
    _write_atomic(tmp / META, json.dumps(meta, indent=1, sort_keys=True).encode(), lambda: _fault("meta", step))
    _fsync_dir(tmp)
    _fault("publish", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _fault("latest", step)
    _write_atomic(root / "LATEST", final.name.encode())
    _fault("prune", step)
    _prune(root, keep)
    return final


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage (tied weights) are stored once."""
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for ckpt in done[:-keep]:
        shutil.rmtree(ckpt, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` ones are never complete)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return ``meta`` if every file is present with its recorded sha256, else raise CheckpointError."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise CheckpointError(f"{meta_path}: not a checkpoint's meta (no sha256 table)")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):  # older checkpoints have none
        raise CheckpointError(f"{meta_path}: checksum mismatch (corrupted)")
    expected_step = _dir_step(path)
    if meta.get("step") != expected_step:
        raise CheckpointError(f"{meta_path}: step {meta.get('step')!r} does not match its directory {path.name}")
    for name in FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if _sha256(f) != meta.get("sha256", {}).get(name):
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupted)")
    return meta


def _dir_step(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return None


def find_checkpoint(run_dir: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; bad ones are reported through ``log`` and skipped."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            meta = verify_checkpoint(path)
        except CheckpointError as e:
            log(f"checkpoint {path.name} rejected: {e}; trying the previous one")
            continue
        return Checkpoint(path, int(meta["step"]), meta)
    return None


def load_weights(path: Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` (tied weights restored from their one copy)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / FILES[0]))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n in missing if _is_tied(model, n, weights)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{path / FILES[0]}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


def _is_tied(model: nn.Module, name: str, weights: dict) -> bool:
    state = model.state_dict(keep_vars=True)
    t = state[name]
    return any(other in weights and state[other] is t for other in state if other != name)


def load_state(path: Path) -> dict[str, Any]:
    """``state.pt`` without executing pickled code (``weights_only=True``: tensors, containers and
    numbers only; anything else is refused with ``pickle.UnpicklingError``)."""
    return torch.load(path / FILES[1], map_location="cpu", weights_only=True)
