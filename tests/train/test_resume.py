"""Exact resume: a run killed with SIGKILL mid-training and restarted with ``--resume=true`` ends
with the same weights, validation loss and metrics log as an uninterrupted run (CPU, same seed).

The runs are real ``mhckit train`` processes (``sys.executable -m mhckit.cli train``) on Python's
own ``pydoc_data/topics.py`` as the corpus, with a tiny mHC GPT and one torch thread (the same
kernels, hence the same floating-point results, in every process). Offline.

Why bitwise equality is expected: every piece of state the next step depends on is restored
exactly (weights, AdamW moments and step counts, the data sampler's generator, the CPU RNG and the
running loss mean behind ``spike_ratio``), and a CPU process with one thread computes the same
floats from the same inputs. Only ``tokens_per_s`` (wall-clock) may differ between the runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydoc_data.topics
import pytest
import torch

import mhckit
from mhckit.train import checkpoint as ckpt
from mhckit.train import cli_train
from mhckit.train import data as D
from mhckit.train import fetch as F
from mhckit.train.trainer import MetricsLog

TOPICS = Path(pydoc_data.topics.__file__)
SOURCE = Path(mhckit.__file__).resolve().parents[1]  # the subprocesses run this checkout's mhckit
CKPT_EVERY = 10
STEPS = (120, 480)  # the kill is retried once with more steps if the first run finished first
TIMEOUT = 300  # seconds for one subprocess; a healthy one takes a few seconds

ARGS = [
    f"--data={TOPICS}", "--progress=false", "--threads=1", "--device=cpu", "--seed=0", "--batch_size=8",
    "--warmup_steps=10", "--log_every=1", "--eval_every=20", "--eval_batches=2", "--diag_every=40",
    f"--ckpt_every={CKPT_EVERY}", "--keep_ckpts=2",
    "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.seq_len=32",
]


# --------------------------------------------------------------------------- helpers


def cli_args(out_dir: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [f"--name={name}", f"--out_dir={out_dir}", f"--steps={steps}", *ARGS, *extra]


def command(out_dir: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mhckit.cli", "train", *cli_args(out_dir, name, steps, *extra)]


def run_cli(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete record (a line torn by the writer being killed is skipped)."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def comparable(records: list[dict]) -> list[dict]:
    """The records without their wall-clock field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt.checkpoint_dir(run_dir) / f"step_{steps:08d}"
    assert ckpt.verify_checkpoint(path)["step"] == steps
    return load_file(str(path / ckpt.FILES[0]))


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kill_mid_run(cmd: list[str], run_dir: Path, env: dict, log: Path) -> dict | None:
    """Start ``cmd``; once it has a complete checkpoint at step >= CKPT_EVERY *and* has logged at
    least 3 steps past it (so the log must be truncated on resume), SIGKILL it.

    The trigger is the run's own progress on disk, not a sleep, so it does not depend on the speed
    of the machine. Returns what was on disk at the kill, or None if the run finished first.
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                if proc.returncode != 0:
                    pytest.fail(f"run exited with {proc.returncode} before the kill:\n{log.read_text()}")
                return None
            done = ckpt.complete_checkpoints(run_dir)
            if done and step_of(done[-1]) >= CKPT_EVERY:
                logged = [r["step"] for r in read_metrics(run_dir)]
                if logged and max(logged) >= step_of(done[-1]) + 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"run made no checkpoint within {TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:  # it finished between the last look and the signal
        return None
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    return {
        "checkpoints": [step_of(p) for p in ckpt.complete_checkpoints(run_dir)],
        "logged": max(r["step"] for r in read_metrics(run_dir)),
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Subprocess environment with a private token cache, filled once here."""
    cache = tmp_path_factory.mktemp("cache")
    D.load_token_data(TOPICS, cache_dir=cache)
    path = os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, **{F.CACHE_ENV: str(cache), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})


@pytest.fixture
def torch_threads():
    """In-process runs set torch's thread count (--threads=1): restore it afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env) -> dict:
    """Run B killed mid-training and resumed; run A uninterrupted with the same steps."""
    root = tmp_path_factory.mktemp("resume")
    for steps in STEPS:
        out = root / f"steps{steps}"
        killed = kill_mid_run(command(out, "b", steps), out / "b", env, root / f"b{steps}.log")
        if killed is not None:
            break
    else:
        pytest.fail(f"run B finished before it could be killed, even with {STEPS[-1]} steps: the machine is "
                    "faster than this test assumes; raise STEPS")
    assert not (out / "b" / "summary.json").exists(), "the killed run wrote its summary: it was not mid-way"
    assert max(killed["checkpoints"]) < steps, killed
    metrics_at_kill = read_metrics(out / "b")

    resumed = run_cli(command(out, "b", steps, "--resume=true"), env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = run_cli(command(out, "a", steps), env)
    assert a.returncode == 0, a.stdout + a.stderr
    return {"root": out, "steps": steps, "a": out / "a", "b": out / "b", "killed": killed,
            "metrics_at_kill": metrics_at_kill, "resume_stdout": resumed.stdout}


# --------------------------------------------------------------------------- the kill and resume


def test_killed_run_resumes_from_its_last_checkpoint(runs):
    """The kill left steps logged past the last checkpoint; the restart says where it resumed."""
    killed = runs["killed"]
    last = max(killed["checkpoints"])
    assert CKPT_EVERY <= last < runs["steps"] and killed["logged"] >= last + 3, killed
    assert f"(step {last})" in runs["resume_stdout"], runs["resume_stdout"]
    assert any(r["step"] > last for r in runs["metrics_at_kill"])  # so the log had to be truncated


def test_resumed_weights_equal_uninterrupted_run(runs):
    wa, wb = final_weights(runs["a"], runs["steps"]), final_weights(runs["b"], runs["steps"])
    assert sorted(wa) == sorted(wb)
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"tensors that differ after resume: {different}"


def test_resumed_val_loss_equals_uninterrupted_run(runs):
    sa = json.loads((runs["a"] / "summary.json").read_text())
    sb = json.loads((runs["b"] / "summary.json").read_text())
    assert sb["steps"] == sa["steps"] == runs["steps"]
    assert sb["val_loss"] == sa["val_loss"]


def test_resumed_metrics_log_each_step_once_and_equal(runs):
    ma, mb = read_metrics(runs["a"]), read_metrics(runs["b"])
    steps = runs["steps"]
    for kind, expected in (("train", range(1, steps + 1)),
                           ("eval", [s for s in range(1, steps + 1) if s % 20 == 0 or s == steps]),
                           ("diag", [s for s in range(1, steps + 1) if s % 40 == 0 or s == steps])):
        logged = [r["step"] for r in mb if r["kind"] == kind]
        assert logged == list(expected), f"{kind} steps of the resumed run: lost or duplicated"
    assert len(mb) == len(ma)
    for ra, rb in zip(comparable(ma), comparable(mb)):
        assert rb == ra, f"step {ra['step']} {ra['kind']}: resumed {rb} vs uninterrupted {ra}"
    assert (runs["b"] / "metrics.jsonl").read_text().endswith("\n")


# --------------------------------------------------------------------------- the edge cases


def test_resume_of_a_complete_run_changes_nothing(runs, tmp_path, env, monkeypatch, capsys, torch_threads):
    """Resuming a finished run trains nothing, writes no checkpoint and keeps the log and weights."""
    monkeypatch.setenv(F.CACHE_ENV, env[F.CACHE_ENV])
    run = tmp_path / "b"
    shutil.copytree(runs["b"], run)
    before_ckpt = tree_digest(ckpt.checkpoint_dir(run))
    before_metrics = (run / "metrics.jsonl").read_bytes()
    val_loss = json.loads((run / "summary.json").read_text())["val_loss"]

    assert cli_train.main(cli_args(tmp_path, "b", runs["steps"], "--resume=true")) == 0
    out = capsys.readouterr().out
    assert f"(step {runs['steps']})" in out
    assert tree_digest(ckpt.checkpoint_dir(run)) == before_ckpt
    assert (run / "metrics.jsonl").read_bytes() == before_metrics
    assert json.loads((run / "summary.json").read_text())["val_loss"] == val_loss


def test_resume_without_checkpoint_starts_from_zero(tmp_path, env, monkeypatch, capsys, torch_threads):
    monkeypatch.setenv(F.CACHE_ENV, env[F.CACHE_ENV])
    assert cli_train.main(cli_args(tmp_path, "fresh", 3, "--resume=true")) == 0
    out = capsys.readouterr().out
    assert f"resume: no complete checkpoint in {tmp_path / 'fresh'}; starting from step 0" in out
    assert [step_of(p) for p in ckpt.complete_checkpoints(tmp_path / "fresh")] == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "fresh") if r["kind"] == "train"] == [1, 2, 3]


def test_new_run_over_existing_checkpoints_is_refused(runs, tmp_path, env):
    """Without --resume a run directory with checkpoints is left alone, with a clear error."""
    run = tmp_path / "b"
    shutil.copytree(runs["b"], run)
    before = tree_digest(run)
    proc = run_cli(command(tmp_path, "b", runs["steps"]), env)
    assert proc.returncode != 0
    assert f"name: run directory {run} already has checkpoints; pass --resume=true" in proc.stderr, proc.stderr
    assert tree_digest(run) == before


def test_metrics_truncation_drops_later_and_torn_records(tmp_path):
    """SIGKILL can land inside a metrics write: the torn last line is dropped with the records
    after the checkpoint, and the log stays whole (it is rewritten through a rename)."""
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in range(1, 8):
        log.write(kind="train", step=step, loss=1.0 / step)
    with open(log.path, "a") as f:
        f.write('{"kind": "diag", "step": 8, "h_res_mean": [[0.25, 0.2')  # torn, no newline
    log.truncate_after(5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert log.path.read_text().endswith("}\n")
    log.write(kind="train", step=6, loss=0.5)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob("*.tmp"))
