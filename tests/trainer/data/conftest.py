"""Shared helpers: small local data files and configs that build in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data.config import DataConfig, SourceConfig
from trainer.data.corpus import builtin_corpus_path


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: text}) + "\n" for text in texts))
    return str(path)


def documents(prefix: str, count: int, length: int = 40) -> list[str]:
    """`count` distinct documents of about `length` characters."""
    return [f"{prefix} {i}: " + "abcdefghij"[i % 10] * length for i in range(count)]


@pytest.fixture
def two_source_cfg(tmp_path: Path) -> DataConfig:
    """Sources "a" (weight 0.75) and "b" (0.25), a few hundred 16-token sequences each."""
    return DataConfig(
        sources=[
            SourceConfig("a", write_jsonl(tmp_path / "a.jsonl", documents("alpha", 150)), 0.75),
            SourceConfig("b", write_jsonl(tmp_path / "b.jsonl", documents("beta", 60)), 0.25),
        ],
        seq_len=16,
        eval_fraction=0.05,
        eval_batches=3,
        cache_dir=str(tmp_path / "cache"),
        record_sample_ids=True,
    )


@pytest.fixture(scope="session")
def builtin_cache_dir(tmp_path_factory) -> str:
    """A cache dir holding both built-in corpora, built once per test session (~5 s)."""
    cache = str(tmp_path_factory.mktemp("builtin-cache"))
    for spec in ("stdlib:prose", "stdlib:code"):
        builtin_corpus_path(spec, cache)
    return cache
