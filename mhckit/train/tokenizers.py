"""Tokenisers for the training harness, behind one small interface.

* ``"byte"`` (default): UTF-8 bytes, vocabulary 256; decoding replaces invalid UTF-8 with U+FFFD.
* ``"gpt2"``: GPT-2's byte-level BPE (Radford et al. 2019; vocabulary 50,257 with
  ``<|endoftext|>`` = 50256) run by OpenAI's ``tiktoken``. The encoding is built locally from
  ``gpt2.tiktoken`` out of the ``openai-whisper`` 20250625 sdist (see :mod:`mhckit.train.fetch`)
  with the ``r50k_base`` split pattern copied from ``tiktoken_ext/openai_public.py``, because
  ``tiktoken.get_encoding`` downloads its files at run time and fails offline. ``tiktoken`` is
  imported only when this tokeniser is asked for.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from .fetch import PathLike, fetch_file

# From tiktoken_ext/openai_public.py (tiktoken 0.14): the GPT-2 / r50k_base pre-tokeniser, an
# equivalent but faster form of the original GPT-2 pattern
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokeniser."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int] | Any) -> str: ...


def _as_ids(ids: Iterable[int] | Any, vocab_size: int) -> list[int]:
    """Token ids from a list, numpy array or torch tensor, range-checked against the vocabulary."""
    if hasattr(ids, "tolist"):  # numpy array, torch tensor
        ids = ids.tolist()
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"decode: ids={bad[:5]}... are outside the vocabulary "
                         f"[0, {vocab_size}) of this tokenizer")
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path used when tokenising a corpus: uint8 array of the UTF-8 bytes."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int] | Any) -> str:
        return bytes(_as_ids(ids, self.vocab_size)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def load_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (lines of ``base64(token) rank``).

    Same format as ``tiktoken.load.load_tiktoken_bpe``, parsed here so that no copy is written to
    tiktoken's own cache in the temporary directory.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not a .tiktoken line: {line[:60]!r}") from exc
    return ranks


class GPT2Tokenizer:
    """GPT-2 BPE through ``tiktoken``, built from a local ``gpt2.tiktoken`` file.

    ``encode`` treats ``<|endoftext|>`` in the text as ordinary text (``encode_ordinary``); append
    :attr:`eot_token` yourself to mark document ends.
    """

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_token = GPT2_EOT_ID

    def __init__(self, vocab_file: PathLike):
        try:
            import tiktoken
        except ImportError as exc:
            raise RuntimeError("tokenizer='gpt2' needs the `tiktoken` package "
                               "(pip install tiktoken); tokenizer='byte' needs nothing") from exc
        self.vocab_file = Path(vocab_file)
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=R50K_PAT_STR,
            mergeable_ranks=load_tiktoken_ranks(self.vocab_file),
            special_tokens={GPT2_EOT: GPT2_EOT_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int] | Any) -> str:
        return self._enc.decode(_as_ids(ids, self.vocab_size), errors="replace")

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_file={str(self.vocab_file)!r})"


TOKENIZERS = ("byte", "gpt2")


def get_tokenizer(name: str = "byte", cache_dir: PathLike | None = None) -> Tokenizer:
    """Tokeniser by name: ``"byte"`` or ``"gpt2"`` (fetches and caches the vocabulary once)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(fetch_file(cache_dir=cache_dir))
    raise ValueError(f"tokenizer={name!r} is not a known tokenizer; choose one of "
                     f"{', '.join(repr(t) for t in TOKENIZERS)}")


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode(text)`` as a numpy array, through ``encode_array`` when it has one."""
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return np.asarray(fast(text))
    return np.asarray(tokenizer.encode(text), dtype=np.int64)
