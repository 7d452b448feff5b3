"""Checkpoints: atomic directories, checksums, fallback to the previous checkpoint, a pickle-free
loader, pruning and tied weights (mhckit.train.checkpoint). Offline, in-process, fast."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mhckit.models.gpt import GPT, GPTConfig
from mhckit.train import checkpoint as ckpt

TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16)


def tiny_gpt(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **kw}))


def save(run: Path, step: int, model: torch.nn.Module | None = None, keep: int = 2, **state) -> Path:
    model = model or tiny_gpt(step)
    state = {"step": torch.tensor(step), "rng": torch.get_rng_state(), **state}
    return ckpt.save_checkpoint(run, step, model.state_dict(), state, {"note": "test"}, keep=keep)


def steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in ckpt.complete_checkpoints(run)]


def rewrite_sha(path: Path, name: str) -> None:
    """Record the current sha256 of ``name`` in meta.json (so only the loader stands in the way)."""
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"][name] = ckpt._sha256(path / name)
    meta["meta_sha256"] = ckpt._meta_digest(meta)  # and meta.json's own checksum
    (path / "meta.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- atomicity


def test_layout_and_latest(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    meta = ckpt.verify_checkpoint(path)
    assert meta["step"] == 7 and meta["note"] == "test" and set(meta["sha256"]) == set(ckpt.FILES)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000007"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_leftover_tmp_directory_is_ignored_and_pruned(tmp_path, capsys):
    """A kill during a save leaves ``step_X.tmp/``: never a checkpoint, removed by the next save."""
    save(tmp_path, 10)
    root = ckpt.checkpoint_dir(tmp_path)
    torn = root / "step_00000020.tmp"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half a file")
    assert steps(tmp_path) == [10]
    found = ckpt.find_checkpoint(tmp_path, log=print)
    assert found.step == 10 and found.path == root / "step_00000010"
    assert capsys.readouterr().out == ""  # skipped silently: a .tmp is not a checkpoint at all
    save(tmp_path, 20)
    assert not torn.exists()
    assert steps(tmp_path) == [10, 20]
    assert ckpt.find_checkpoint(tmp_path).step == 20


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", ckpt.FILES)
def test_damaged_checkpoint_is_rejected_and_previous_used(tmp_path, damage, name):
    save(tmp_path, 10)
    bad = save(tmp_path, 20)
    f = bad / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        i = len(data) - 5  # inside the tensor data, not the header
        f.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    else:
        f.unlink()
    messages = []
    found = ckpt.find_checkpoint(tmp_path, log=messages.append)
    assert found is not None and found.step == 10
    assert len(messages) == 1 and str(f) in messages[0], messages
    assert ("missing" if damage == "delete" else "checksum mismatch") in messages[0]
    with pytest.raises(ckpt.CheckpointError, match=str(f)):
        ckpt.verify_checkpoint(bad)


def test_unreadable_meta_is_rejected(tmp_path):
    save(tmp_path, 10)
    bad = save(tmp_path, 20)
    (bad / "meta.json").write_text('{"step": 20, "sha2')
    messages = []
    assert ckpt.find_checkpoint(tmp_path, log=messages.append).step == 10
    assert str(bad / "meta.json") in messages[0] and "unreadable" in messages[0]


def test_no_good_checkpoint_gives_none(tmp_path):
    assert ckpt.find_checkpoint(tmp_path) is None  # no directory at all
    bad = save(tmp_path, 10)
    (bad / "state.pt").write_bytes(b"")
    messages = []
    assert ckpt.find_checkpoint(tmp_path, log=messages.append) is None
    assert len(messages) == 1


def test_keep_ckpts_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep=3)
    assert steps(tmp_path) == [3, 4, 5]
    save(tmp_path, 6, keep=1)
    assert steps(tmp_path) == [6]
    assert (ckpt.checkpoint_dir(tmp_path) / "LATEST").read_text() == "step_00000006"


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 10, tiny_gpt(1))
    model = tiny_gpt(2)
    path = save(tmp_path, 10, model)
    assert steps(tmp_path) == [10]
    loaded = tiny_gpt(3)
    ckpt.load_weights(path, loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------- the pickle-free loader


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: arbitrary code, harmless here."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_state_is_loaded_without_running_pickled_code(tmp_path):
    path = save(tmp_path, 10)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": {}, "evil": _Payload(marker)}, path / "state.pt")
    rewrite_sha(path, "state.pt")  # the checksum is right: only weights_only=True stands in the way
    assert ckpt.verify_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_state(path)
    assert not marker.exists()
    # the payload is live: a plain pickle load would have run it
    torch.load(path / "state.pt", weights_only=False)
    assert marker.exists()


def test_state_round_trip(tmp_path):
    """What the trainer stores (tensors, ints, floats, None, nested dicts) loads with weights_only."""
    model = tiny_gpt(0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    state = {"optimizer": opt.state_dict(), "sampler": {"seed": 3, "step": 5, "generator_state": g.get_state()},
             "rng_cpu": torch.get_rng_state(), "loss_ema": 2.5, "nothing": None}
    path = ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), state, {})
    back = ckpt.load_state(path)
    assert back["loss_ema"] == 2.5 and back["nothing"] is None and back["sampler"]["step"] == 5
    assert torch.equal(back["sampler"]["generator_state"], g.get_state())
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# --------------------------------------------------------------------------- tied weights


def test_tied_embeddings_round_trip(tmp_path):
    from safetensors.torch import load_file

    model = tiny_gpt(0, tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    path = save(tmp_path, 1, model)
    stored = load_file(str(path / "model.safetensors"))
    assert "embed.weight" in stored and "head.weight" not in stored  # stored once
    loaded = tiny_gpt(1, tie_embeddings=True)
    assert not torch.equal(loaded.embed.weight, model.embed.weight)
    ckpt.load_weights(path, loaded)
    assert loaded.head.weight is loaded.embed.weight  # still one parameter
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # and they stay shared
        loaded.embed.weight.add_(1.0)
    assert torch.equal(loaded.head.weight, loaded.embed.weight)


def test_untied_weights_round_trip_and_mismatch_is_reported(tmp_path):
    from safetensors.torch import load_file

    model = tiny_gpt(0, tie_embeddings=False)
    path = save(tmp_path, 1, model)
    assert {"embed.weight", "head.weight"} <= set(load_file(str(path / "model.safetensors")))
    loaded = tiny_gpt(1, tie_embeddings=False)
    ckpt.load_weights(path, loaded)
    assert loaded.head.weight is not loaded.embed.weight
    assert torch.equal(loaded.head.weight, model.head.weight)
    # an untied model cannot be filled from a tied checkpoint: head.weight is missing
    tied = save(tmp_path, 2, tiny_gpt(0, tie_embeddings=True))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['head.weight'\]"):
        ckpt.load_weights(tied, tiny_gpt(1, tie_embeddings=False))


def test_files_are_synced_before_the_directory_is_published(tmp_path, monkeypatch):
    """Every file is fsynced before the rename that publishes the directory."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    path = save(tmp_path, 3)
    tmp = str(path) + ".tmp"
    for name in (*ckpt.FILES, "meta.json"):
        assert any(Path(s).parent == Path(tmp) and Path(s).name.startswith(name) for s in synced), (name, synced)
    assert tmp in synced  # the directory itself, before the rename


# --------------------------------------------------------------------------- optimiser state


def _trained(seed: int):
    model = tiny_gpt(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(8).view(1, 8), torch.arange(1, 9).view(1, 8))[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("legacy", [False, True], ids=["by-name", "by-index"])
def test_optimizer_state_round_trip(tmp_path, legacy):
    """The trainer stores the optimiser state keyed by parameter name (the layout that DDP, FSDP
    and one process share); an index-keyed ``Optimizer.state_dict()`` still loads in one process."""
    from mhckit.train import distributed as dist_utils

    model, opt = _trained(0)
    state = opt.state_dict() if legacy else dist_utils.full_optimizer_state(model, opt)
    if not legacy:
        assert set(state["state"]) == {n for n, _ in model.named_parameters()}
        assert state["param_groups"][0]["params"][0] == "embed.weight"
    path = ckpt.save_checkpoint(tmp_path, 2, model.state_dict(), {"optimizer": state}, {})
    fresh = tiny_gpt(1)
    ckpt.load_weights(path, fresh)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    dist_utils.load_optimizer_state(fresh, fresh_opt, ckpt.load_state(path)["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))  # loading did not step
    expected, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    for i, s in expected["state"].items():
        for key, value in s.items():
            assert torch.equal(got["state"][i][key], value), (i, key)


# --------------------------------------------------------------------------- meta.json and the writer's crash points


@pytest.mark.parametrize("offset", [0, 1, 0.25, 0.5, 0.75, -2, -1])
def test_any_flipped_byte_of_meta_is_detected(tmp_path, offset):
    """meta.json carries its own sha256: a flipped byte anywhere (digits of a checksum, the step,
    the config, the JSON syntax) rejects the checkpoint instead of trusting a wrong table."""
    save(tmp_path, 10)
    bad = save(tmp_path, 20)
    f = bad / "meta.json"
    data = bytearray(f.read_bytes())
    i = int(offset * len(data)) if isinstance(offset, float) else offset % len(data)
    data[i] ^= 0x01
    f.write_bytes(bytes(data))
    messages = []
    assert ckpt.find_checkpoint(tmp_path, log=messages.append).step == 10
    assert len(messages) == 1 and str(f) in messages[0], messages
    assert any(why in messages[0] for why in (": unreadable (", ": checksum mismatch", "does not match its directory"))


def test_missing_meta_and_wrong_step_are_rejected(tmp_path):
    save(tmp_path, 10)
    bad = save(tmp_path, 20)
    (bad / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"^{bad / 'meta.json'}: missing$"):
        ckpt.verify_checkpoint(bad)
    assert ckpt.find_checkpoint(tmp_path, log=lambda m: None).step == 10
    # a directory renamed to another step (or a meta.json copied into one) is not trusted either
    good = save(tmp_path, 30)
    moved = good.with_name("step_00000040")
    good.rename(moved)
    with pytest.raises(ckpt.CheckpointError, match=r"meta.json: step 30 does not match its directory step_00000040"):
        ckpt.verify_checkpoint(moved)


def test_checkpoints_without_a_meta_checksum_still_load(tmp_path):
    """Checkpoints written before meta.json had its own sha256 verify on the file checksums alone."""
    path = save(tmp_path, 10)
    meta = json.loads((path / "meta.json").read_text())
    del meta["meta_sha256"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.find_checkpoint(tmp_path).step == 10


class _Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing after the fault point runs (no except / finally
    in the writer catches a BaseException that is not an Exception)."""


@pytest.mark.parametrize("point", ckpt.FAULT_POINTS)
def test_writer_dying_at_any_point_leaves_a_loadable_run(tmp_path, monkeypatch, point):
    """Die at each point of a save: the newest checkpoint that loads is the previous one until the
    directory is published, then the new one (LATEST lagging behind does not matter); the next
    save of the same step succeeds and removes the debris."""
    save(tmp_path, 10)
    save(tmp_path, 20)
    real = ckpt._fault

    def fault(name, step):
        if (name, step) == (point, 30):
            raise _Killed(name)
        real(name, step)

    monkeypatch.setattr(ckpt, "_fault", fault)
    with pytest.raises(_Killed):
        save(tmp_path, 30, keep=2)
    published = ckpt.FAULT_POINTS.index(point) >= ckpt.FAULT_POINTS.index("latest")
    messages = []
    found = ckpt.find_checkpoint(tmp_path, log=messages.append)
    assert found.step == (30 if published else 20) and messages == []
    assert steps(tmp_path) == ([10, 20, 30] if published else [10, 20])  # pruning had not run yet
    latest = (ckpt.checkpoint_dir(tmp_path) / "LATEST").read_text()
    assert latest == ("step_00000030" if point == "prune" else "step_00000020")
    monkeypatch.setattr(ckpt, "_fault", real)
    model = tiny_gpt(30)
    path = save(tmp_path, 30, model, keep=2)
    assert steps(tmp_path) == [20, 30] and not list(ckpt.checkpoint_dir(tmp_path).glob("*.tmp"))
    loaded = tiny_gpt(0)
    ckpt.load_weights(path, loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_fault_injection_is_inert_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_ENV, "checkpoint:weights:999")  # another step: nothing happens
    save(tmp_path, 10)
    assert steps(tmp_path) == [10]


# --------------------------------------------------------------------------- the load-path audit


def test_no_load_path_can_run_pickled_code():
    """Every deserialisation in the package is pickle-free: ``torch.load`` only with
    ``weights_only=True``, weights through safetensors, no ``pickle`` / ``numpy`` pickle loads."""
    import re

    import mhckit

    root = Path(mhckit.__file__).parent
    offenders = []
    for f in sorted(root.rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f.relative_to(root)}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\b", r"\bcloudpickle\b",
                        r"weights_only\s*=\s*False"):
            offenders += [f"{f.relative_to(root)}: {m.group(0)}" for m in re.finditer(pattern, src)]
    assert offenders == []
