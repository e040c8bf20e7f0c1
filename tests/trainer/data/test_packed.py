"""Loading local files, packing into seq_len + 1 rows, held-out split and the prepared cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.config import SourceConfig
from trainer.data.packed import load_packed_source
from trainer.data.tokenizer import ByteTokenizer

from .conftest import documents, write_jsonl

TOKENIZER = ByteTokenizer()
BOS, EOS = TOKENIZER.bos_id, TOKENIZER.eos_id


def load(source: SourceConfig, tmp_path: Path, seq_len: int = 8, eval_fraction: float = 0.1):
    cache = str(tmp_path / "cache")
    return load_packed_source(source, "bytes", TOKENIZER, seq_len, eval_fraction, cache)


def all_rows(packed) -> np.ndarray:
    return np.concatenate([packed.train[:], packed.eval[:]])


def expected_rows(texts: list[str], seq_len: int) -> np.ndarray:
    """Documents framed as BOS text EOS, concatenated, cut into seq_len + 1 rows."""
    tokens = np.array([t for text in texts if text for t in [BOS, *text.encode(), EOS]])
    n_rows = len(tokens) // (seq_len + 1)
    return tokens[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1)


def test_jsonl_packs_documents_separated_by_eos(tmp_path):
    texts = documents("doc", 30)
    packed = load(SourceConfig("a", write_jsonl(tmp_path / "a.jsonl", texts)), tmp_path)
    rows = all_rows(packed)
    np.testing.assert_array_equal(rows, expected_rows(texts, 8))
    assert packed.train.shape[1] == 9 and packed.train.dtype == np.uint16
    assert all(isinstance(m, np.memmap) for m in packed.train.shards._maps.values())
    assert len(packed.eval) == round(len(rows) * 0.1)  # the last rows are held out
    np.testing.assert_array_equal(packed.eval[:], rows[-len(packed.eval) :])
    np.testing.assert_array_equal(packed.train[3], rows[3])


def test_text_column_and_directory_of_files(tmp_path):
    write_jsonl(tmp_path / "dir" / "1.jsonl", documents("one", 20), column="body")
    write_jsonl(tmp_path / "dir" / "sub" / "2.jsonl", documents("two", 20), column="body")
    packed = load(SourceConfig("d", str(tmp_path / "dir"), text_column="body"), tmp_path)
    expected = expected_rows(documents("one", 20) + documents("two", 20), 8)
    np.testing.assert_array_equal(all_rows(packed), expected)
    with pytest.raises(ValueError, match="no column 'text'.*text_column"):
        load(SourceConfig("e", str(tmp_path / "dir")), tmp_path)


def test_txt_paragraphs_are_documents(tmp_path):
    texts = documents("para", 30)
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(texts) + "\n")
    packed = load(SourceConfig("t", str(path)), tmp_path, eval_fraction=0.0)
    assert len(packed.eval) == 0
    # datasets keeps the file's final newline in the last paragraph
    expected = expected_rows([*texts[:-1], texts[-1] + "\n"], 8)
    np.testing.assert_array_equal(packed.train[:], expected)


def test_parquet(tmp_path):
    texts = documents("pq", 30)
    pq.write_table(pa.table({"content": texts, "id": range(30)}), tmp_path / "a.parquet")
    source = SourceConfig("p", str(tmp_path / "a.parquet"), text_column="content")
    packed = load(source, tmp_path, eval_fraction=0.0)
    np.testing.assert_array_equal(packed.train[:], expected_rows(texts, 8))


def test_cache_is_reused_for_any_seq_len_and_keyed_by_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", documents("doc", 30))
    load(SourceConfig("a", path), tmp_path)
    cache_dirs = list((tmp_path / "cache" / "prepared").glob("a-*"))
    assert len(cache_dirs) == 1
    manifest = cache_dirs[0] / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    load(SourceConfig("a", path), tmp_path)
    sixteen = load(SourceConfig("a", path), tmp_path, seq_len=16)
    assert manifest.stat().st_mtime_ns == mtime and sixteen.train.row_len == 17
    write_jsonl(tmp_path / "a.jsonl", documents("changed", 30))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    changed = load(SourceConfig("a", path), tmp_path)
    assert len(list((tmp_path / "cache" / "prepared").glob("a-*"))) == 2
    assert bytes(changed.train[0][1:8].tolist()) == b"changed"
    assert not list((tmp_path / "cache" / "prepared").rglob("*.tmp"))


def test_source_too_small_names_the_source(tmp_path):
    tiny = SourceConfig("tiny", write_jsonl(tmp_path / "t.jsonl", ["hello"]))
    with pytest.raises(ValueError, match="'tiny'.*packs into 0 sequences"):
        load(tiny, tmp_path)
    one_row = SourceConfig("one", write_jsonl(tmp_path / "o.jsonl", ["x" * 10]))
    with pytest.raises(ValueError, match="'one'.*packs into 1 sequences"):
        load(one_row, tmp_path)


def test_mixed_formats_in_a_directory(tmp_path):
    write_jsonl(tmp_path / "dir" / "a.jsonl", ["a"])
    (tmp_path / "dir" / "b.txt").write_text("b")
    with pytest.raises(ValueError, match="mixes file formats"):
        load(SourceConfig("m", str(tmp_path / "dir")), tmp_path)
