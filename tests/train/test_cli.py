"""The ``mhckit`` command line: help lists every option; bad options fail early with exit code 2."""

from __future__ import annotations

import pytest

from mhckit import cli
from mhckit.train.config import TrainConfig
from mhckit.train.overrides import flatten_fields

COMMANDS = ("train", "compare")


def _run(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_trainconfig_field(command, capsys):
    code, out, _ = _run(capsys, [command, "--help"])
    assert code == 0
    paths = [path for path, *_ in flatten_fields(TrainConfig)]
    assert len(paths) > 30
    missing = [p for p in paths if f"--{p}=" not in out]
    assert not missing, f"mhckit {command} --help does not list {missing}"
    assert "--preset" in out


def test_compare_help_documents_its_own_options(capsys):
    _, out, _ = _run(capsys, ["compare", "--help"])
    for opt in ("--preset", "--variants", "--seeds", "--name", "mhc-lite", "stress", "gpu-124m"):
        assert opt in out


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_key_exits_2_and_names_it(command, capsys):
    code, _, err = _run(capsys, [command, "--nonsense=1"])
    assert code == 2
    assert "--nonsense" in err and "unknown option" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_value_names_the_field(command, capsys):
    code, _, err = _run(capsys, [command, "--steps=abc"])
    assert code == 2
    assert "--steps" in err and "'abc'" in err and "int" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_invalid_value_names_the_field(command, capsys):
    code, _, err = _run(capsys, [command, "--steps=0"])
    assert code == 2
    assert "steps" in err and ">= 1" in err


@pytest.mark.parametrize("argv, needle", [
    (["--variants=residual,bogus"], "--variants"),
    (["--variant=hc"], "--variants"),
    (["--seeds=0"], "--seeds"),
    (["--preset=nope"], "--preset"),
    (["--resume=true"], "--resume"),
])
def test_compare_rejects_bad_options(argv, needle, capsys):
    code, _, err = _run(capsys, ["compare", *argv])
    assert code == 2
    assert needle in err


def test_seed_is_not_abbreviated_to_seeds(monkeypatch):
    """``--seed`` is the first seed (a TrainConfig field), not a prefix of ``--seeds``."""
    from mhckit.train import compare

    seen = {}
    monkeypatch.setattr(compare, "run_compare", lambda base, variants, seeds, name, **kw: seen.update(
        seeds=seeds, name=name, variants=variants) or {"table": "", "stats": {}, "report": "r", "wall_s": 0.0})
    assert compare.main(["--seed=5", "--seeds=3", "--variants=mhc"]) == 0
    assert seen == {"seeds": [5, 6, 7], "name": "compare-default", "variants": ["mhc"]}


def test_sample_and_diagnose_need_a_run(capsys):
    for command in ("sample", "diagnose"):
        code, _, err = _run(capsys, [command])
        assert code == 2 and "--run" in err
