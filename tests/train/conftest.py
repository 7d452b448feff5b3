"""Shared pieces of the training tests: the local corpus, its cache, the metrics log reader."""

from __future__ import annotations

import json
from pathlib import Path

import pydoc_data.topics
import pytest

from mhckit.train import data as D

TOPICS = Path(pydoc_data.topics.__file__)  # a text corpus that ships with Python (no download)


@pytest.fixture(scope="session")
def topics_cache(tmp_path_factory) -> Path:
    """A data cache directory holding the tokenised TOPICS corpus (read-only for the tests)."""
    root = tmp_path_factory.mktemp("cache")
    D.load_token_data(TOPICS, cache_dir=root)
    return root


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` ([] when there is none); a torn line raises."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
