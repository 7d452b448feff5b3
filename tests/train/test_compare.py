"""Tests for ``mhckit compare`` and its report (tiny models on a local text file, no network).

One module-scoped comparison (hc + mhc, one seed) is shared by the report, figure, skip,
sample and diagnose tests; the residual baseline, mhc-lite and two seeds are covered by one more
comparison, and a run that diverges (made non-finite in-process) by a third. Everything runs on
one torch thread (~15 s in all on the 2-core dev machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pydoc_data.topics
import pytest

from mhckit.train import compare, report
from mhckit.train.report import RunResult, VariantStats
from mhckit.train.runinfo import run_info

TOPICS = Path(pydoc_data.topics.__file__)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--model.n_layer=2", "--model.d_model=16", "--model.n_head=2", "--model.seq_len=16", "--steps=6",
    "--batch_size=4", "--eval_every=3", "--diag_every=2", "--log_every=1", "--eval_batches=2", "--ckpt_every=3",
    "--warmup_steps=2", "--progress=false", f"--data={TOPICS}",
]


def tiny_args(tmp: Path, name: str = "cmp", variants: str = "hc,mhc", seeds: int = 1) -> list[str]:
    return [f"--variants={variants}", f"--seeds={seeds}", f"--name={name}", f"--out_dir={tmp}",
            f"--cache_dir={tmp / 'cache'}", *TINY]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_compare(_one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    assert compare.main(tiny_args(root)) == 0
    return root, root / "cmp"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_compare_writes_report_table_and_pngs(tiny_compare, capsys):
    _, out = tiny_compare
    text = (out / "report.md").read_text()
    assert "| variant |" in text and "| hc |" in text and "| mhc |" in text
    assert f"; CPU kernels: {run_info()['cpu_kernels']}; commit" in text  # results depend on the kernel build
    for name in report.FIGURES.values():
        path = out / name
        assert _is_png(path), name
        assert path.stat().st_size < 150_000, name
        assert f"]({name})" in text
    for run in ("hc-s0", "mhc-s0"):
        d = out / run
        assert (d / "summary.json").is_file() and (d / "metrics.jsonl").is_file()
        extra = json.loads((d / "compare_run.json").read_text())
        mem = extra["memory"]
        assert mem["activation_bytes"] > 0
        assert mem["total_bytes"] == mem["param_bytes"] * 4 + mem["activation_bytes"]
    assert "estimated training memory (params+grads+Adam+saved activations)" in text
    meta = json.loads((out / "compare.json").read_text())
    assert meta["seeds"] == [0] and meta["variants"] == ["hc", "mhc"]
    assert meta["data"]["num_tokens"] == meta["data"]["train_tokens"] + meta["data"]["val_tokens"]


def test_report_states_max_composite_gain_for_hc_and_mhc(tiny_compare):
    _, out = tiny_compare
    text = (out / "report.md").read_text()
    for variant in ("hc", "mhc"):
        line = next(l for l in text.splitlines() if f"**max composite gain** ({variant})" in l)
        assert "forward" in line and "backward" in line
        assert any(ch.isdigit() for ch in line.split("forward", 1)[1])
    assert "mHC's largest composite gain is" in text
    assert any(k in text for k in ("HC did not blow up", "HC's composite gain grew", "blew up", "non-finite"))


def test_rerun_skips_finished_runs(tiny_compare, capsys):
    root, out = tiny_compare
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert compare.main(tiny_args(root)) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == before
    assert json.loads((out / "compare.json").read_text())["runs"]["mhc-s0"]["status"] == "skipped"


def test_rerun_with_other_config_is_an_error(tiny_compare, capsys):
    root, _ = tiny_compare
    args = [a for a in tiny_args(root) if not a.startswith("--steps=")] + ["--steps=7"]
    with pytest.raises(SystemExit) as e:
        compare.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "steps: 6 on disk, 7 now" in err and "--name" in err


def test_killed_run_is_resumed(tmp_path, capsys):
    """A run without summary.json but with a checkpoint is resumed, not restarted or skipped."""
    args = tiny_args(tmp_path, variants="mhc")
    assert compare.main(args) == 0
    run = tmp_path / "cmp" / "mhc-s0"
    final_loss = json.loads((run / "summary.json").read_text())["val_loss"]
    (run / "summary.json").unlink()
    from mhckit.train import checkpoint as ckpt
    import shutil

    done = ckpt.complete_checkpoints(run)
    shutil.rmtree(done[-1])  # "killed" after the step-3 checkpoint
    (run / "checkpoints" / "LATEST").unlink(missing_ok=True)
    capsys.readouterr()
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert "resuming mhc" in printed and "resumed from" in printed
    assert json.loads((run / "summary.json").read_text())["val_loss"] == pytest.approx(final_loss, abs=1e-6)


def test_sample_prints_requested_number_of_tokens(tiny_compare, capsys):
    from mhckit.train import sample

    _, out = tiny_compare
    text, ids = sample.sample_text(out / "mhc-s0", prompt="The ", tokens=37, seed=1)
    assert len(ids) == 37 and all(0 <= i < 256 for i in ids)
    again, ids2 = sample.sample_text(out / "mhc-s0", prompt="The ", tokens=37, seed=1)
    assert ids2 == ids  # seeded
    assert sample.main([f"--run={out / 'mhc-s0'}", "--tokens=20", "--prompt=abc", "--temperature=0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("abc")


def test_sample_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from mhckit.train import sample

    with pytest.raises(SystemExit) as e:
        sample.main([f"--run={tmp_path}"])
    assert e.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_diagnose_writes_pngs_and_table(tiny_compare, tmp_path, capsys):
    from mhckit.train import diagnose

    _, out = tiny_compare
    dest = tmp_path / "diag"
    assert diagnose.main([f"--run={out / 'hc-s0'}", f"--out={dest}", f"--data={TOPICS}"]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn" in printed and "max composite gain" in printed
    for name in (diagnose.FIG_GAIN, diagnose.FIG_HEAT):
        assert _is_png(dest / name)
    record = json.loads((dest / "diagnose.json").read_text())
    assert record["variant"] == "hc" and len(record["forward_gain"]) == 4


# --------------------------------------------------------------------------- the reading (pure)


def _stats(variant: str, losses: list[float], gain: float | None = None) -> VariantStats:
    runs = [RunResult(variant, i, Path("."), {"val_loss": v, "params": 1}, [], [], [], {}) for i, v in enumerate(losses)]
    s = report.variant_stats(variant, runs)
    s.max_fwd_gain = s.max_bwd_gain = s.final_fwd_gain = s.final_bwd_gain = gain
    return s


def test_reading_only_claims_what_the_seed_spread_supports():
    base = _stats("residual", [2.00, 2.02])
    overlap = _stats("mhc", [1.99, 2.01], 1.0)
    clear = _stats("mhc", [1.90, 1.91], 1.0)
    assert "overlap" in report._compare_losses(overlap, base) and "no difference" in report._compare_losses(overlap, base)
    assert "beyond the seed spread" in report._compare_losses(clear, base)
    single = report._compare_losses(_stats("mhc", [1.9], 1.0), _stats("residual", [2.0]))
    assert "one seed" in single and "not evidence" in single
    diverged = report._compare_losses(_stats("hc", [math.nan, 2.0], 5.0), base)
    assert "non-finite" in diverged


def test_reading_states_throughput_as_unpaired():
    """The throughput sentence gives each variant's ratio and says how it was timed (one run after
    another), pointing to the interleaved benchmark; it names no code path it cannot know."""
    base, mhc = _stats("residual", [2.0, 2.1]), _stats("mhc", [2.0, 2.1], 1.0)
    base.tokens_per_s, mhc.tokens_per_s = 1000.0, 700.0
    line = next(s for s in report.reading({"residual": base, "mhc": mhc}) if s.startswith("Throughput"))
    assert "mhc 0.70x" in line and "one after another" in line and "bench_model" in line
    assert "pure-PyTorch" not in line  # the CPU kernels or Triton run by default since the fused kernels


def test_gain_sentences_hc_blowup_and_mhc_bound():
    calm = report.gain_sentences({"hc": _stats("hc", [2.0], 1.3), "mhc": _stats("mhc", [2.0], 1.0)})
    assert any("HC did not blow up" in s and "1.300" in s for s in calm)
    assert any("stays at most 2" in s for s in calm)
    wild = report.gain_sentences({"hc": _stats("hc", [2.0], 4321.0), "mhc": _stats("mhc", [2.0], 2.5)})
    assert any("blew up to 4.321e+03" in s for s in wild)
    middle = report.gain_sentences({"hc": _stats("hc", [2.0], 14.7)})
    assert any("grew to 14.7" in s and "did not blow up" in s for s in middle)
    assert any("ABOVE 2" in s for s in wild)


def test_full_compare_four_variants_two_seeds(tmp_path):
    assert compare.main(tiny_args(tmp_path, variants="residual,hc,mhc,mhc-lite", seeds=2)) == 0
    text = (tmp_path / "cmp" / "report.md").read_text()
    for v in ("residual", "hc", "mhc", "mhc-lite"):
        assert f"| {v} |" in text
    assert "Δ vs residual" in text and "2 seeds" in text
    assert len(list((tmp_path / "cmp").glob("*-s1/summary.json"))) == 4


# --------------------------------------------------------------------------- a run that diverges


def _diverge(monkeypatch, variant: str, seed: int, after: int) -> None:
    """Make every training step of one run non-finite once ``after`` updates are applied (through the
    trainer's real skip / stop path: the loss is NaN, so are the gradients)."""
    from mhckit.train import trainer as T

    real = T.Trainer.train_step

    def train_step(self, x, y):
        cfg = self.cfg
        if cfg.model.hc.variant != variant or cfg.seed != seed or self.step < after:
            return real(self, x, y)
        forward = self.forward

        def poisoned(x, y=None):
            logits, loss = forward(x, y)
            return logits, loss * float("nan")

        self.forward = poisoned
        try:
            return real(self, x, y)
        finally:
            self.forward = forward

    monkeypatch.setattr(T.Trainer, "train_step", train_step)


def _row(text: str, variant: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))


def test_diverged_run_is_recorded_reported_and_skipped_on_rerun(tmp_path, monkeypatch, capsys):
    """hc seed 1 diverges at step 4 (steps 1-3 applied, checkpoint at 3, max_bad_steps=2): the
    comparison finishes, the run gets diverged.json, the report shows it (table, list, reading,
    figures) and leaves it out of hc's loss statistics, and a rerun skips it instead of retraining."""
    _diverge(monkeypatch, "hc", seed=1, after=3)
    args = tiny_args(tmp_path, variants="residual,hc", seeds=2) + ["--max_bad_steps=2"]
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "cmp"
    run = out / "hc-s1"
    assert "[4/4] hc-s1: DIVERGED at step 4" in printed and "going on with the other runs" in printed
    marker = json.loads((run / "diverged.json").read_text())
    assert marker["step"] == 4 and marker["steps"] == 6 and marker["last_good_step"] == 3
    assert marker["last_good_checkpoint"].endswith("step_00000003") and marker["error"].startswith("max_bad_steps: 2 ")
    assert marker["params"] == json.loads((out / "hc-s0" / "summary.json").read_text())["params"]
    assert not (run / "summary.json").exists() and (run / "compare_run.json").exists()
    for other in ("residual-s0", "hc-s0", "residual-s1"):  # the other runs are whole
        summary = json.loads((out / other / "summary.json").read_text())
        assert summary["steps"] == 6 and math.isfinite(summary["val_loss"])
        assert not (out / other / "diverged.json").exists()
    meta = json.loads((out / "compare.json").read_text())
    assert meta["runs"]["hc-s1"]["status"] == "diverged" and meta["runs"]["hc-s1"]["diverged_at"] == 4
    assert meta["runs"]["hc-s0"]["status"] == "trained"

    text = (out / "report.md").read_text()
    hc0 = json.loads((out / "hc-s0" / "summary.json").read_text())["val_loss"]
    row = _row(text, "hc")
    assert f"{hc0:.4f} ± 0.0000 [{hc0:.4f}, {hc0:.4f}]; 1 of 2 seeds diverged (seed 1 at step 4), left out" in row
    assert "diverged" not in _row(text, "residual")
    assert "- `hc-s1`: diverged at step 4 of 6; last good checkpoint `hc-s1/checkpoints/step_00000003` (step 3)" in text
    assert "**hc diverged** on 1 of 2 seeds (seed 1 at step 4 of 6)" in text
    assert "diverged and left out: hc 1 of 2" in text
    assert "it trained 4 of 4 runs, 1 of which diverged" in text
    for name in ("val_loss", "grad_norm", "gain_depth", "gain_step"):
        assert _is_png(out / report.FIGURES[name]), name

    monkeypatch.undo()  # the same configuration again, now without the poison: still not retrained
    before = (run / "diverged.json").stat().st_mtime_ns
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert "[4/4] hc-s1: diverged earlier at step 4 with the same configuration; skipped" in printed
    assert printed.count("skipped") == 4 and "DIVERGED" not in printed
    assert (run / "diverged.json").stat().st_mtime_ns == before and not (run / "summary.json").exists()
    meta = json.loads((out / "compare.json").read_text())
    assert meta["runs"]["hc-s1"] == {"status": "skipped", "diverged_at": 4}
    assert "1 of 2 seeds diverged (seed 1 at step 4)" in _row((out / "report.md").read_text(), "hc")


def _diverged(variant: str, seed: int, step: int, evals: list[tuple[int, float]]) -> RunResult:
    marker = {"step": step, "steps": 10, "last_good_checkpoint": None, "last_good_step": None, "params": 7}
    return RunResult(variant, seed, Path(f"{variant}-s{seed}"), {"val_loss": None, "params": 7},
                     [{"step": s, "grad_norm": 1.0 + s, "tokens_per_s": 100.0} for s, _ in evals],
                     [{"step": s, "val_loss": v} for s, v in evals], [], {}, marker)


def test_variant_diverged_on_every_seed_is_reported_not_averaged(tmp_path):
    """Pure report functions on runs built by hand: every hc seed diverged (at different steps, with
    metrics of different lengths), residual finished."""
    finished = [RunResult("residual", i, Path("."), {"val_loss": 2.0 + i / 50, "params": 7}, [],
                          [{"step": s, "val_loss": 3.0 - s / 10} for s in (2, 4, 6)], [], {}) for i in range(2)]
    base = report.variant_stats("residual", finished)
    hc = report.variant_stats("hc", [_diverged("hc", 0, 5, [(2, 3.0), (4, 2.9)]), _diverged("hc", 1, 3, [(2, 3.1)])])
    assert hc.losses == [] and math.isnan(hc.loss_mean) and hc.params == 7 and len(hc.diverged) == 2
    stats = {"residual": base, "hc": hc}
    row = _row(report.results_table(stats), "hc")
    assert "| diverged on all 2 seeds (seed 0 at step 5, seed 1 at step 3) | - |" in row
    assert report._compare_losses(hc, base) == "hc vs residual: not comparable, hc diverged on every seed."
    lines = report.divergence_sentences(stats)
    assert len(lines) == 1
    assert "**hc diverged** on 2 of 2 seeds (seed 0 at step 5 of 10, seed 1 at step 3 of 10)" in lines[0]
    assert "no final validation loss" in lines[0] and lines[0] in report.reading(stats)
    curves = report._curves(stats, lambda r: [(e["step"], e["val_loss"]) for e in r.evals])
    assert set(curves) == {"residual", "hc, diverged"} and [len(c) for c in curves["hc, diverged"]] == [2, 1]
    figs = report.make_figures(stats, tmp_path)  # partial curves of different lengths: drawn, no error
    assert set(figs) == {"val_loss", "grad_norm"} and all(_is_png(p) for p in figs.values())


def test_measured_memory_is_the_compiled_steps_where_the_run_compiles(tmp_path, topics_cache):
    """compare's CPU memory estimate follows the run: a compiled run with recomputation saves what its
    compiled graph saves (checkpoint regions of whole blocks), not what the eager hooks would."""
    import torch

    from mhckit.models import GPTConfig
    from mhckit.train import data as D
    from mhckit.train.config import TrainConfig

    torch._dynamo.reset()
    data = D.load_token_data(TOPICS, cache_dir=topics_cache)
    model = GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=16, recompute=-1)
    cfg = dict(out_dir=str(tmp_path), data=str(TOPICS), batch_size=4, device="cpu", precision="float32", model=model)
    device = torch.device("cpu")
    eager = compare.measure_memory(tmp_path / "none", TrainConfig(**cfg), data, device)
    compiled = compare.measure_memory(tmp_path / "none", TrainConfig(compile=True, **cfg), data, device)
    assert compiled["param_bytes"] == eager["param_bytes"]
    assert compiled["activation_bytes"] != eager["activation_bytes"], (compiled, eager)
