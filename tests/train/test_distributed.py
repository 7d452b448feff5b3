"""DDP and FSDP2 under ``torchrun`` (2 processes, gloo, CPU) against one process.

One ``torchrun --standalone --nproc_per_node=2`` launch per parallelism runs
``tests/train/dist_worker.py`` (first-step gradients, a 4-step run with a checkpoint, and that run
resumed to 6 steps under the same parallelism); the test does the same in this process with
``parallel="none"``, the same seed and the same global batch, and compares.

Tolerances. One step: rtol 1e-5, atol 1e-6 (float32). The two ranks each average the loss over
half the batch and the gradients are averaged across ranks, so the sums are grouped differently
from one process: the difference is float32 rounding (seen: relative 1e-7 on the loss, 6e-7 on
the worst gradient). After training steps the weights are compared with atol 1e-4 (1% of one
step of lr=1e-2): AdamW divides by sqrt(v) + eps, so a near-zero gradient component can magnify
a rounding difference up to lr / eps; the differences seen are <= 1e-5. A wrong optimiser state
(reset moments) or a wrong data position (another batch) moves the weights by ~lr instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydoc_data.topics
import pytest
import torch

import mhckit
from mhckit.models.gpt import GPT
from mhckit.train import checkpoint as ckpt
from mhckit.train import data as D
from mhckit.train import fetch as F
from mhckit.train.trainer import Trainer, train
from tests.train.conftest import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import BATCH, first_step_grads, tiny_config  # noqa: E402

TOPICS = str(Path(pydoc_data.topics.__file__))
WORKER = Path(__file__).parent / "dist_worker.py"
SOURCE = Path(mhckit.__file__).resolve().parents[1]  # the workers run this checkout's mhckit
TIMEOUT = 300  # seconds for one launch; it takes ~10
STEP_TOL = dict(rtol=1e-5, atol=1e-6)
TRAINED_TOL = dict(rtol=1e-4, atol=1e-4)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt.checkpoint_dir(run) / f"step_{step:08d}"
    assert ckpt.verify_checkpoint(path)["step"] == step
    return load_file(str(path / ckpt.FILES[0]))


def assert_weights_close(actual: dict, expected: dict, **tol) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def single(tmp_path_factory, topics_cache) -> dict:
    """The same three things in one process: first-step gradients, 4 steps, resumed to 6."""
    out = tmp_path_factory.mktemp("single")
    threads, env = torch.get_num_threads(), os.environ.get(F.CACHE_ENV)
    os.environ[F.CACHE_ENV] = str(topics_cache)
    try:
        trainer = Trainer(tiny_config("none", TOPICS, str(out), name="grads"))
        grads = first_step_grads(trainer)
        trainer.close()
        s4 = train(tiny_config("none", TOPICS, str(out), name="run", steps=4))
        s6 = train(tiny_config("none", TOPICS, str(out), name="run", steps=6, resume=True))
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop(F.CACHE_ENV)
        else:
            os.environ[F.CACHE_ENV] = env
    return {"out": out, "grads": grads, "summary4": s4, "summary6": s6, "run": out / "run"}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def launched(request, tmp_path_factory, topics_cache) -> dict:
    """One 2-process torchrun launch of dist_worker.py under ``parallel``."""
    parallel = request.param
    out = tmp_path_factory.mktemp(parallel)
    proc = _torchrun(parallel, out, topics_cache)
    return {
        "parallel": parallel, "out": out, "stdout": proc.stdout, "run": out / "run",
        "grads": torch.load(out / "grads.pt", weights_only=True),
        "summary4": json.loads((out / "summary4.json").read_text()),
        "summary6": json.loads((out / "summary6.json").read_text()),
    }


def _torchrun(parallel: str, out: Path, topics_cache, *mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{F.CACHE_ENV: str(topics_cache), "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), parallel, TOPICS, str(out), *mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"torchrun {parallel} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_recompute_under_torchrun_matches_one_process(parallel, single, tmp_path, topics_cache):
    """torch.compile + stream recomputation (checkpoint regions, mhckit/recompute.py) under DDP and
    FSDP2: 4 steps end where the eager one-process run without recomputation ended."""
    _torchrun(parallel, tmp_path, topics_cache, "compiled-recompute")
    summary = json.loads((tmp_path / "summary4.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    torch.testing.assert_close(summary["val_loss"], single["summary4"]["val_loss"], rtol=1e-5, atol=0)
    assert_weights_close(weights(tmp_path / "run", 4), weights(single["run"], 4), **TRAINED_TOL)


@pytest.fixture
def torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_first_step_loss_and_gradients_match_one_process(launched, single):
    dist, ref = launched["grads"], single["grads"]
    assert dist["world_size"] == 2 and dist["rows"] == BATCH // 2 and ref["rows"] == BATCH
    torch.testing.assert_close(torch.tensor(dist["loss"]), torch.tensor(ref["loss"]), **STEP_TOL)
    assert sorted(dist["grads"]) == sorted(ref["grads"])
    for name, g in ref["grads"].items():
        # the gates alpha scale phi @ x with phi = 0 at the function-preserving init: zero gradient
        assert name.endswith(".alpha") or g.abs().max() > 0, f"{name}: zero gradient, a vacuous comparison"
        torch.testing.assert_close(dist["grads"][name], g, **STEP_TOL, msg=lambda m: f"{name}: {m}")


def test_distributed_run_checkpoints_like_one_process(launched, single):
    """Same checkpoint layout as one process: tied weights once, optimiser state keyed by name."""
    run, ref = launched["run"], single["run"]
    assert launched["summary4"]["world_size"] == 2 and launched["summary4"]["steps"] == 4
    assert [int(p.name[5:]) for p in ckpt.complete_checkpoints(run)] == [4, 6]
    assert sorted(weights(run, 4)) == sorted(weights(ref, 4))
    assert "head.weight" not in weights(run, 4)  # tied to embed.weight, stored once
    state, ref_state = (ckpt.load_state(ckpt.checkpoint_dir(r) / "step_00000004") for r in (run, ref))
    assert sorted(state["optimizer"]["state"]) == sorted(ref_state["optimizer"]["state"])
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == \
        [g["params"] for g in ref_state["optimizer"]["param_groups"]]
    assert state["sampler"]["step"] == ref_state["sampler"]["step"] == 4
    assert torch.equal(state["sampler"]["generator_state"], ref_state["sampler"]["generator_state"])
    for name, s in ref_state["optimizer"]["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(state["optimizer"]["state"][name][key], value, **TRAINED_TOL)


def test_distributed_training_matches_one_process(launched, single):
    torch.testing.assert_close(launched["summary4"]["val_loss"], single["summary4"]["val_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(launched["summary6"]["val_loss"], single["summary6"]["val_loss"], rtol=1e-5, atol=0)
    assert_weights_close(weights(launched["run"], 4), weights(single["run"], 4), **TRAINED_TOL)
    assert_weights_close(weights(launched["run"], 6), weights(single["run"], 6), **TRAINED_TOL)
    dist_train, ref_train = ([r for r in read_metrics(run) if r["kind"] == "train"]
                             for run in (launched["run"], single["run"]))
    assert [r["step"] for r in dist_train] == [r["step"] for r in ref_train]
    for got, want in zip(dist_train, ref_train):  # the loss all-reduced, the norm of the full gradient
        for key in ("loss", "grad_norm", "spike_ratio"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=0, msg=lambda m: f"{got['step']} {key}: {m}")
        assert got["lr"] == want["lr"]


def test_distributed_resume_logs_each_step_once(launched):
    assert "resumed from" in launched["stdout"] and "(step 4)" in launched["stdout"]
    records = read_metrics(launched["run"])
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 6]


def test_distributed_checkpoint_loads_in_one_process(launched, single, topics_cache, monkeypatch, torch_threads):
    """The FSDP / DDP checkpoint is a plain full state dict: load it into a one-process model."""
    monkeypatch.setenv(F.CACHE_ENV, str(topics_cache))
    trainer = Trainer(tiny_config("none", TOPICS, str(launched["out"]), name="eval"))
    model = trainer.raw_model
    assert isinstance(model, GPT) and model.head.weight is model.embed.weight
    ckpt.load_weights(ckpt.checkpoint_dir(launched["run"]) / "step_00000004", model)
    assert model.head.weight is model.embed.weight
    torch.testing.assert_close(trainer.evaluate(), launched["summary4"]["val_loss"], rtol=1e-6, atol=0)


def test_one_process_resumes_distributed_checkpoint(launched, single, tmp_path, topics_cache, monkeypatch, capsys,
                                                    torch_threads):
    """Model, optimiser and sampler state written under DDP / FSDP resume in one process: it ends
    where the distributed run's own continuation ended (and where the one-process run ended)."""
    monkeypatch.setenv(F.CACHE_ENV, str(topics_cache))
    run = tmp_path / "run"
    shutil.copytree(launched["run"], run)
    shutil.rmtree(ckpt.checkpoint_dir(run) / "step_00000006")
    summary = train(tiny_config("none", TOPICS, str(tmp_path), name="run", steps=6, resume=True))
    assert "(step 4)" in capsys.readouterr().out
    torch.testing.assert_close(summary["val_loss"], launched["summary6"]["val_loss"], rtol=1e-5, atol=0)
    assert_weights_close(weights(run, 6), weights(launched["run"], 6), **TRAINED_TOL)
    assert_weights_close(weights(run, 6), weights(single["run"], 6), **TRAINED_TOL)
