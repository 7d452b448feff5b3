"""The README's runnable examples run as written, and the files it links to exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"no python block after {heading!r}"
    return m.group(1)


def test_quick_start_runs_and_the_residual_switch_is_a_plain_residual():
    """The Quick start block as printed: mHC streams in, [B, T, C] out, gradients reach every
    hyper-connection parameter; with variant="residual" the same code is x + f(x) layer by layer."""
    code = _python_block_after("## Quick start")
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md: Quick start", "exec"), ns)
    out, hcs, h = ns["out"], ns["hcs"], ns["h"]
    assert out.shape == h.shape == (2, 10, ns["C"])
    out.square().mean().backward()
    assert all(p.grad is not None for hc in hcs for p in hc.coeffs.parameters())

    # the README's claim under the block: variant="residual" turns the same code into x + f(x)
    torch.manual_seed(0)
    ns2: dict = {}
    exec(compile(code.replace('variant="mhc"', 'variant="residual"'), "README.md: Quick start", "exec"), ns2)
    x = ns2["h"]
    for hc in ns2["hcs"]:
        x = x + hc.branch(x)
    assert torch.equal(ns2["out"], x)


def test_linked_files_exist():
    """Every relative link and every `benchmarks/results/...` file the README names is in the tree."""
    links = re.findall(r"\]\(((?!https?:|#)[^)\s]+)\)", README)
    named = re.findall(r"`((?:benchmarks/results|docs)/[\w./-]+\.(?:md|csv|png))`", README)
    missing = [p for p in links + named if not (ROOT / p.split("#", 1)[0]).exists()]
    assert not missing, missing
    results = ROOT / "benchmarks" / "results"
    for name in re.findall(r"`((?:model|layer|ops|route)_[\w{},]+\.md)`", README):
        if "{" in name:  # `model_default_cpu_{hc_pair,lite,identity}.md`
            head, alts, tail = re.match(r"(.*)\{(.*)\}(.*)", name).groups()
            names = [head + a + tail for a in alts.split(",")]
        else:
            names = [name]
        for n in names:
            assert (results / n).exists() or list(results.glob(f"*/{n}")), n
    gpu = re.findall(r"`(h200/[\w.]+)`", README)
    assert gpu and all((results / n).exists() for n in gpu), gpu
