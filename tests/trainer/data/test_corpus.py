"""Built-in corpora: built once, deterministic, and really two different domains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data.corpus import builtin_corpus_path, code_documents


@pytest.fixture
def corpora(builtin_cache_dir) -> dict[str, str]:
    return {
        kind: builtin_corpus_path(f"stdlib:{kind}", builtin_cache_dir) for kind in ("prose", "code")
    }


def read_texts(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


def test_built_once_into_cache_dir(corpora):
    for kind, path in corpora.items():
        assert path.endswith(f"corpus/{kind}.jsonl")
        assert Path(path).stat().st_size > 500_000
        mtime = Path(path).stat().st_mtime_ns
        assert builtin_corpus_path(f"stdlib:{kind}", str(Path(path).parent.parent)) == path
        assert Path(path).stat().st_mtime_ns == mtime
    assert not list(Path(path).parent.glob("*.tmp"))


def test_code_corpus_is_deterministic(corpora):
    assert read_texts(corpora["code"]) == list(code_documents())


def test_prose_corpus_is_deterministic(corpora, tmp_path):
    assert (
        Path(builtin_corpus_path("stdlib:prose", str(tmp_path))).read_bytes()
        == Path(corpora["prose"]).read_bytes()
    )


def byte_histogram(text: str) -> np.ndarray:
    counts = np.bincount(np.frombuffer(text.encode(), dtype=np.uint8), minlength=256)
    return counts / counts.sum()


def test_prose_and_code_are_different_domains(corpora):
    prose = "\n".join(read_texts(corpora["prose"]))
    code = "\n".join(read_texts(corpora["code"]))
    total_variation = 0.5 * np.abs(byte_histogram(prose) - byte_histogram(code)).sum()
    assert total_variation > 0.1
    per_kb = lambda text, pattern: text.count(pattern) / len(text) * 1000
    assert per_kb(code, "def ") > 5 * per_kb(prose, "def ")
    assert per_kb(code, "\n        ") > 3 * per_kb(prose, "\n        ")
    assert per_kb(code, ":\n") > 3 * per_kb(prose, ":\n")
    assert per_kb(prose, " the ") > 3 * per_kb(code, " the ")


def test_unknown_builtin(tmp_path):
    with pytest.raises(ValueError, match="stdlib:poetry"):
        builtin_corpus_path("stdlib:poetry", str(tmp_path))
