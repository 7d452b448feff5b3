"""`make demo` runs mhckit.demo: a short end-to-end run must train and print finite gains."""

import pytest
import torch

from mhckit.cli import main
from mhckit.demo import run


def test_demo_trains_and_reports(capsys):
    out = run(steps=8, seed=0)
    for losses in out["losses"].values():
        assert losses[-1] < losses[0]
    rep = out["report"]
    assert rep["forward_gain"].shape == (8,) and torch.isfinite(rep["backward_gain"]).all()
    torch.testing.assert_close(rep["forward_gain"], torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-5)
    assert "forward_gain" in capsys.readouterr().out


def test_cli_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--steps", "0"])
    assert e.value.code == 2
    assert "--steps: got 0" in capsys.readouterr().err
