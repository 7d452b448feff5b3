"""Faults: non-finite steps, a process killed inside a checkpoint write, damaged checkpoints.

* Non-finite loss or gradient norm (in-process trainers on Python's own ``pydoc_data/topics.py``):
  the step is skipped (weights, AdamW state and the learning-rate schedule untouched), logged to
  the metrics JSONL and the log, and ``max_bad_steps`` in a row stop the run with the last good
  checkpoint left as it was. The skip decision is one all-reduce (tested here by making the
  reduction report another rank's bad value).
* SIGKILL inside a checkpoint write, made deterministic by ``MHCKIT_FAULT_INJECT`` (the writer
  kills itself at a named point of the save of a given step): real ``mhckit train`` processes,
  resumed with ``--resume=true``, end bitwise equal to an uninterrupted run (weights, validation
  loss, metrics log), also when the newest checkpoint was then damaged on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydoc_data.topics
import pytest
import torch

import mhckit
from mhckit.models.gpt import GPTConfig
from mhckit.train import checkpoint as ckpt
from mhckit.train import cli_train
from mhckit.train import data as D
from mhckit.train import fetch as F
from mhckit.train import trainer as T
from mhckit.train.config import TrainConfig
from tests.train.conftest import read_metrics

TOPICS = Path(pydoc_data.topics.__file__)
SOURCE = Path(mhckit.__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one subprocess; a healthy one takes a few
TINY = GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=16)


@pytest.fixture(scope="module")
def data(topics_cache):
    return D.load_token_data(TOPICS, cache_dir=topics_cache)


def config(out: Path, name: str = "run", **kw) -> TrainConfig:
    base = dict(name=name, out_dir=str(out), data=str(TOPICS), seed=0, steps=6, batch_size=4, lr=1e-2,
                warmup_steps=2, eval_every=100, eval_batches=1, diag_every=100, log_every=1, ckpt_every=0,
                keep_ckpts=2, device="cpu", precision="float32", progress=False, model=TINY, max_bad_steps=3)
    return TrainConfig(**{**base, **kw})


def poison_loss(trainer: T.Trainer, bad_calls, finite_grads: bool = False) -> dict:
    """Make the training loss NaN on the given (1-based) training forward calls.

    ``finite_grads``: the reported loss is NaN but its gradient is the real one (what a rank sees
    when only its own loss is bad and DDP averages finite gradients)."""
    real, calls = trainer.forward, {"n": 0}

    def forward(x, y=None):
        if y is None:  # evaluation
            return real(x)
        calls["n"] += 1
        logits, loss = real(x, y)
        if calls["n"] in bad_calls:
            nan = torch.tensor(float("nan"))
            loss = loss.detach() * nan + (loss - loss.detach()) if finite_grads else loss * nan
        return logits, loss

    trainer.forward = forward
    return calls


def snapshot(trainer: T.Trainer) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    opt = trainer.opt.state_dict()
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in opt["state"].items()}
    return params, {"state": state, "param_groups": [dict(g) for g in opt["param_groups"]]}


def assert_unchanged(trainer: T.Trainer, before: tuple[dict, dict]) -> None:
    params, opt = before
    now_params, now_opt = snapshot(trainer)
    assert all(torch.equal(params[k], now_params[k]) for k in params), "weights changed on a skipped step"
    assert now_opt["param_groups"] == opt["param_groups"]
    assert opt["state"].keys() == now_opt["state"].keys()
    for i, s in opt["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(now_opt["state"][i][k]), torch.as_tensor(v)), (i, k)


# --------------------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_non_finite_step_changes_nothing(tmp_path, data, where):
    trainer = T.Trainer(config(tmp_path), data=data, log=lambda *a: None)
    try:
        x, y = next(trainer.sampler)
        assert trainer.train_step(x, y)[2] is False  # one good step: AdamW has state to protect
        before = snapshot(trainer)
        if where == "loss":
            poison_loss(trainer, {1})
        else:  # finite loss, one NaN gradient
            hook = trainer.raw_model.embed.weight.register_hook(lambda g: g * float("nan"))
        loss, gnorm, skipped = trainer.train_step(*next(trainer.sampler))
        assert skipped is True
        assert (loss != loss) if where == "loss" else (loss == loss and gnorm != gnorm)
        assert_unchanged(trainer, before)
        assert all(p.grad is None for p in trainer.raw_model.parameters())  # nothing left for the next step
        if where == "grad_norm":
            hook.remove()
        assert trainer.train_step(*next(trainer.sampler))[2] is False  # and training goes on
    finally:
        trainer.close()


def test_skipped_steps_are_logged_and_do_not_advance_the_schedule(tmp_path, data):
    logs = []
    cfg = config(tmp_path, steps=6, max_bad_steps=3)
    trainer = T.Trainer(cfg, data=data, log=logs.append)
    poison_loss(trainer, {3, 4})  # the 3rd and 4th training batches: step 3 is attempted three times
    try:
        summary = trainer.run()
        opt_steps = {int(s["step"]) for s in trainer.opt.state_dict()["state"].values()}
        consumed = trainer.sampler.step
    finally:
        trainer.close()
    assert opt_steps == {6} and consumed == 8  # 6 updates, 8 batches drawn
    records = read_metrics(tmp_path / "run")
    skips = [r for r in records if r["kind"] == "skip"]
    assert [(r["step"], r["in_a_row"], r["nonfinite"], r["loss"]) for r in skips] == [
        (3, 1, ["loss", "grad_norm"], None), (3, 2, ["loss", "grad_norm"], None)]  # a NaN loss has NaN gradients
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in train] == [T.lr_at(s, cfg) for s in range(6)]  # the schedule follows applied updates
    skipped_twice = "step 3: non-finite loss and grad_norm (loss=nan, grad_norm=nan); skipped the optimizer step (2 in a row"
    assert sum(line.startswith(skipped_twice) and line.endswith("max_bad_steps=3)") for line in logs) == 1
    assert summary["steps"] == 6 and (tmp_path / "run" / "summary.json").exists()


def test_max_bad_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path, data, capsys):
    cfg = config(tmp_path, steps=8, ckpt_every=2, max_bad_steps=3)
    trainer = T.Trainer(cfg, data=data, log=print)
    poison_loss(trainer, set(range(6, 100)))  # every batch from the 6th on: steps 1-5 apply, 6 never does
    run = tmp_path / "run"
    try:
        with pytest.raises(T.NonFiniteTrainingError) as err:
            trainer.run()
    finally:
        trainer.close()
    msg = str(err.value)
    last = ckpt.checkpoint_dir(run) / "step_00000004"
    assert msg.startswith("max_bad_steps: 3 steps in a row had a non-finite loss or gradient norm (at step 6, "
                          "after 5 applied steps); stopping.")
    assert f"the last good one is {last}" in msg and "--resume=true" in msg
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert ckpt.find_checkpoint(run).step == 4  # intact: it verifies
    records = read_metrics(run)
    assert [(r["kind"], r["step"]) for r in records if r["kind"] in ("skip", "stop")] == [
        ("skip", 6), ("skip", 6), ("skip", 6), ("stop", 6)]
    assert not (run / "summary.json").exists()
    assert "skipped the optimizer step (3 in a row, max_bad_steps=3)" in capsys.readouterr().out

    # the stopped run resumes from its last good checkpoint and finishes (the poison was a test hook)
    summary = T.train(config(tmp_path, steps=8, ckpt_every=2, max_bad_steps=3, resume=True), data=data,
                      log=lambda *a: None)
    assert summary["steps"] == 8
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert not [r for r in records if r["kind"] in ("skip", "stop")]  # truncated to step 4 on resume


def test_skip_decision_is_collective(tmp_path, data, monkeypatch):
    """A rank whose own loss and gradients are finite still skips when another rank's were not:
    the reduction that averages the loss also counts the ranks that saw a non-finite value."""
    trainer = T.Trainer(config(tmp_path), data=data, log=lambda *a: None)
    try:
        trainer.train_step(*next(trainer.sampler))
        before = snapshot(trainer)
        seen = []

        def other_rank_was_bad(t, info):  # what all_reduce_sum returns when another rank counted 1
            seen.append(t.clone())
            t[1] += 1

        monkeypatch.setattr(T.dist_utils, "all_reduce_sum", other_rank_was_bad)
        loss, gnorm, skipped = trainer.train_step(*next(trainer.sampler))
        assert skipped and loss == loss and gnorm == gnorm  # finite here, skipped anyway
        assert len(seen) == 1 and seen[0][1].item() == 0
        assert_unchanged(trainer, before)
        monkeypatch.undo()
        poison_loss(trainer, {1}, finite_grads=True)  # a bad loss with finite gradients is caught too
        assert trainer.train_step(*next(trainer.sampler))[2] is True
        assert_unchanged(trainer, before)
    finally:
        trainer.close()


def test_no_checkpoint_from_non_finite_weights(tmp_path, data):
    trainer = T.Trainer(config(tmp_path, steps=2, ckpt_every=1), data=data, log=lambda *a: None)
    try:
        trainer._start()
        trainer.step = 1
        trainer.save()
        with torch.no_grad():
            trainer.raw_model.blocks[0].attn.coeffs.phi[0, :3] = float("inf")
        trainer.step = 2
        with pytest.raises(T.NonFiniteTrainingError, match=r"save: the weights at step 2 have 3 non-finite values; "
                           r"not writing a checkpoint \(the last good one is .*step_00000001\)"):
            trainer.save()
    finally:
        trainer.close()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step_00000001"]
    assert not list(ckpt.checkpoint_dir(tmp_path / "run").glob("*.tmp"))


def test_cli_reports_a_diverged_run(tmp_path, topics_cache, monkeypatch, capsys):
    """A learning rate of 1e30 makes every step after the first non-finite: exit code 3, a clear
    message, and only the first step's checkpoint on disk."""
    monkeypatch.setenv(F.CACHE_ENV, str(topics_cache))
    threads = torch.get_num_threads()
    try:
        code = cli_train.main([f"--out_dir={tmp_path}", "--name=diverge", f"--data={TOPICS}", "--steps=5",
                               "--lr=1e30", "--warmup_steps=0", "--grad_clip=0", "--max_bad_steps=2",
                               "--ckpt_every=1", "--batch_size=4", "--eval_every=100", "--diag_every=100",
                               "--progress=false", "--device=cpu", "--model.n_layer=1", "--model.d_model=16",
                               "--model.n_head=2", "--model.seq_len=16"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("mhckit train: stopped: max_bad_steps: 2 steps in a row had a non-finite loss")
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "diverge")] == ["step_00000001"]


# --------------------------------------------------------------------------- damaged checkpoint, then resume


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> dict:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6, and what it ended with."""
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    try:
        summary = T.train(config(out, steps=6, ckpt_every=2, keep_ckpts=3, threads=1), data=data, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    run = out / "run"
    return {"run": run, "summary": summary, "metrics": read_metrics(run),
            "weights": load_file(str(ckpt.checkpoint_dir(run) / "step_00000006" / ckpt.FILES[0]))}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", [*ckpt.FILES, ckpt.META])
def test_damaged_newest_checkpoint_falls_back_and_the_resume_ends_the_same(finished, tmp_path, data, damage, name):
    """Damage the newest checkpoint of a finished run: the resume names the bad file, goes back to
    the previous checkpoint, retrains the lost steps and ends bitwise where the run had ended."""
    from safetensors.torch import load_file

    shutil.copytree(finished["run"], tmp_path / "run")
    bad = ckpt.checkpoint_dir(tmp_path / "run") / "step_00000006" / name
    raw = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        i = len(raw) - 3
        bad.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
    else:
        bad.unlink()
    logs = []
    threads = torch.get_num_threads()
    try:
        summary = T.train(config(tmp_path, steps=6, ckpt_every=2, keep_ckpts=3, threads=1, resume=True), data=data,
                          log=logs.append)
    finally:
        torch.set_num_threads(threads)
    rejected = [line for line in logs if line.startswith("checkpoint step_00000006 rejected: ")]
    assert len(rejected) == 1 and str(bad) in rejected[0] and rejected[0].endswith("trying the previous one"), logs
    assert f"resumed from {bad.parent.with_name('step_00000004')} (step 4)" in logs
    weights = load_file(str(bad.parent / ckpt.FILES[0]))
    assert [k for k in finished["weights"] if not torch.equal(weights[k], finished["weights"][k])] == []
    assert summary["val_loss"] == finished["summary"]["val_loss"]

    def comparable(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert comparable(read_metrics(tmp_path / "run")) == comparable(finished["metrics"])
    assert ckpt.find_checkpoint(tmp_path / "run").step == 6  # rewritten whole


# --------------------------------------------------------------------------- two processes (DDP, gloo)

DDP_CASES = {  # name -> (training calls whose loss is NaN on rank 1 only, max_bad_steps)
    "skip": ({2}, 3),
    "stop": (set(range(2, 100)), 2),
}


def _ddp_worker(out_dir: str) -> None:
    """Run under torchrun by test_ddp_ranks_agree_to_skip_and_to_stop (see the end of this file).

    Rank 1's loss is NaN on the chosen calls while its gradients stay finite, so only rank 1 sees a
    bad value: if the decision were local, rank 0 would step and the replicas would diverge."""
    rank = int(os.environ["RANK"])
    results, trainer = {}, None
    try:
        for name, (bad_calls, max_bad) in DDP_CASES.items():
            trainer = None  # the previous trainer goes; the process group stays
            cfg = config(Path(out_dir), name=name, steps=4, parallel="ddp", threads=1, max_bad_steps=max_bad)
            trainer = T.Trainer(cfg, log=lambda *a: None)
            if rank == 1:
                poison_loss(trainer, bad_calls, finite_grads=True)
            try:
                trainer.run()
                outcome = "finished"
            except T.NonFiniteTrainingError as e:
                outcome = str(e)
            flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
            results[name] = {
                "outcome": outcome, "step": trainer.step,
                "opt_steps": sorted({int(s["step"]) for s in trainer.opt.state_dict()["state"].values()}),
                "weights": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            }
    finally:
        if trainer is not None:
            trainer.close()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def test_ddp_ranks_agree_to_skip_and_to_stop(tmp_path, topics_cache):
    env = dict(os.environ, **{F.CACHE_ENV: str(topics_cache), "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "ddp-worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # a bad loss on rank 1 alone: both ranks skip that step, apply the other 4, and stay identical
    assert r0["skip"] == r1["skip"], (r0["skip"], r1["skip"])
    assert r0["skip"]["outcome"] == "finished" and r0["skip"]["step"] == 4 and r0["skip"]["opt_steps"] == [4]
    skips = [r for r in read_metrics(tmp_path / "skip") if r["kind"] == "skip"]
    assert [(r["step"], r["nonfinite"], r["loss"]) for r in skips] == [(2, ["loss"], None)]  # the rank mean is NaN
    # rank 1 bad from then on: both ranks stop together after max_bad_steps, no hang, no divergence
    assert r0["stop"]["outcome"] == r1["stop"]["outcome"]
    assert r0["stop"]["outcome"].startswith("max_bad_steps: 2 steps in a row had a non-finite loss")
    assert r0["stop"]["step"] == r1["stop"]["step"] == 1 and r0["stop"]["weights"] == r1["stop"]["weights"]


# --------------------------------------------------------------------------- killed inside a checkpoint write

STEPS, CKPT_EVERY, KILL_STEP = 12, 4, 8
ARGS = [f"--data={TOPICS}", "--progress=false", "--threads=1", "--device=cpu", "--seed=0", "--batch_size=4",
        "--warmup_steps=2", "--log_every=1", "--eval_every=4", "--eval_batches=1", "--diag_every=4",
        f"--ckpt_every={CKPT_EVERY}", "--keep_ckpts=2", f"--steps={STEPS}",
        "--model.n_layer=1", "--model.d_model=16", "--model.n_head=2", "--model.seq_len=16"]
PREVIOUS, KILLED = f"step_{KILL_STEP - CKPT_EVERY:08d}", f"step_{KILL_STEP:08d}"
# scenario -> (point of the save of KILL_STEP where the writer dies, complete checkpoints left).
# Every other point of checkpoint.FAULT_POINTS is covered in-process by tests/train/test_checkpoint.py.
SCENARIOS = {
    "weights": ("weights", [KILL_STEP - CKPT_EVERY]),  # between model.safetensors and state.pt, in step_8.tmp/
    # step_8/ published but LATEST still names step_4; then one byte of step_8's weights is flipped on
    # disk, so the resume must reject step_8 by its checksum and use step_4
    "damaged": ("latest", [KILL_STEP - CKPT_EVERY, KILL_STEP]),
}


def _command(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mhckit.cli", "train", f"--name={name}", f"--out_dir={out}", *ARGS, *extra]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log_file.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, topics_cache) -> dict:
    """Run A uninterrupted; one run per scenario killed inside the save of step 8 and then
    resumed. The processes of a round run concurrently (one torch thread each)."""
    root = tmp_path_factory.mktemp("faults")
    path = os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **{F.CACHE_ENV: str(topics_cache), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
    env.pop(ckpt.FAULT_ENV, None)
    procs = {"a": _start(_command(root, "a"), env, root / "a.log")}
    for name, (point, _) in SCENARIOS.items():
        fault = dict(env, **{ckpt.FAULT_ENV: f"checkpoint:{point}:{KILL_STEP}"})
        procs[name] = _start(_command(root, name), fault, root / f"{name}.log")
    codes = {name: _wait(p) for name, p in procs.items()}
    assert codes["a"] == 0, (root / "a.log").read_text()
    at_kill = {}
    for name in SCENARIOS:
        assert codes[name] == -signal.SIGKILL, f"{name}: exit {codes[name]}\n{(root / f'{name}.log').read_text()}"
        run = root / name
        at_kill[name] = {
            "complete": [int(p.name.removeprefix("step_")) for p in ckpt.complete_checkpoints(run)],
            "tmp": sorted(p.name for p in ckpt.checkpoint_dir(run).glob("*.tmp")),
            "tmp_files": sorted(p.name for p in ckpt.checkpoint_dir(run).glob("*.tmp/*")),
            "latest": (ckpt.checkpoint_dir(run) / "LATEST").read_text(),
            "logged": max(r["step"] for r in read_metrics(run)),
        }
    damaged = ckpt.checkpoint_dir(root / "damaged") / KILLED / ckpt.FILES[0]
    raw = bytearray(damaged.read_bytes())
    raw[-3] ^= 0x01
    damaged.write_bytes(bytes(raw))
    resumed = {name: _start(_command(root, name, "--resume=true"), env, root / f"{name}.resume.log")
               for name in SCENARIOS}
    for name, proc in resumed.items():
        assert _wait(proc) == 0, (root / f"{name}.resume.log").read_text()
    return {"root": root, "at_kill": at_kill, "damaged_file": damaged,
            "resume_log": {name: (root / f"{name}.resume.log").read_text() for name in SCENARIOS}}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt.checkpoint_dir(run) / f"step_{STEPS:08d}"
    assert ckpt.verify_checkpoint(path)["step"] == STEPS
    return load_file(str(path / ckpt.FILES[0]))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_inside_checkpoint_write_leaves_the_previous_checkpoint(killed, scenario):
    state = killed["at_kill"][scenario]
    assert state["complete"] == SCENARIOS[scenario][1], state
    assert state["logged"] == KILL_STEP  # killed inside the save of step 8, before step 9 ran
    assert state["latest"] == PREVIOUS  # LATEST is never ahead of a complete checkpoint
    if scenario == "weights":  # the torn write is a .tmp directory, never a checkpoint
        assert state["tmp"] == [f"{KILLED}.tmp"] and state["tmp_files"] == ["model.safetensors"]
    else:
        assert state["tmp"] == []


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_after_kill_loads_the_last_complete_checkpoint(killed, scenario):
    log = killed["resume_log"][scenario]
    run = killed["root"] / scenario
    assert f"resumed from {ckpt.checkpoint_dir(run) / PREVIOUS} (step {KILL_STEP - CKPT_EVERY})" in log, log
    if scenario == "damaged":
        assert (f"checkpoint {KILLED} rejected: {killed['damaged_file']}: checksum mismatch "
                "(truncated or corrupted); trying the previous one") in log
    assert not list(ckpt.checkpoint_dir(run).glob("*.tmp"))  # the next save cleaned up


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_after_kill_equals_uninterrupted_run(killed, scenario):
    root = killed["root"]
    wa, wb = _weights(root / "a"), _weights(root / scenario)
    assert sorted(wa) == sorted(wb)
    assert [n for n in wa if not torch.equal(wa[n], wb[n])] == []
    sa = json.loads((root / "a" / "summary.json").read_text())
    sb = json.loads((root / scenario / "summary.json").read_text())
    assert sb["val_loss"] == sa["val_loss"] and sb["steps"] == sa["steps"] == STEPS

    def comparable(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]

    assert comparable(root / scenario) == comparable(root / "a")  # nothing lost, nothing twice


if __name__ == "__main__":  # torchrun ... tests/train/test_faults.py ddp-worker OUT_DIR
    assert sys.argv[1] == "ddp-worker", sys.argv
    _ddp_worker(sys.argv[2])
