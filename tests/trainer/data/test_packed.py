"""Loading local files, packing into seq_len + 1 rows, held-out split and the .npy cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.config import SourceConfig
from trainer.data.packed import load_packed_source, pack_tokens
from trainer.data.tokenizer import ByteTokenizer

from .conftest import documents, write_jsonl

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id


def load(source: SourceConfig, tmp_path: Path, seq_len: int = 8, eval_fraction: float = 0.1):
    return load_packed_source(source, TOKENIZER, seq_len, eval_fraction, str(tmp_path / "cache"))


def expected_rows(texts: list[str], seq_len: int) -> np.ndarray:
    tokens = [t for text in texts for t in [*text.encode(), EOS]]
    return pack_tokens(np.array(tokens), seq_len)


def test_jsonl_packs_documents_separated_by_eos(tmp_path):
    texts = documents("doc", 30)
    packed = load(SourceConfig("a", write_jsonl(tmp_path / "a.jsonl", texts)), tmp_path)
    rows = np.concatenate([packed.train, packed.eval])
    np.testing.assert_array_equal(rows, expected_rows(texts, 8))
    assert packed.train.shape[1] == 9 and packed.train.dtype == np.uint16
    assert isinstance(packed.train, np.memmap)
    assert len(packed.eval) == round(len(rows) * 0.1)  # the last rows are held out
    np.testing.assert_array_equal(packed.eval, rows[-len(packed.eval) :])


def test_text_column_and_directory_of_files(tmp_path):
    write_jsonl(tmp_path / "dir" / "1.jsonl", documents("one", 20), column="body")
    write_jsonl(tmp_path / "dir" / "sub" / "2.jsonl", documents("two", 20), column="body")
    packed = load(SourceConfig("d", str(tmp_path / "dir"), text_column="body"), tmp_path)
    expected = expected_rows(documents("one", 20) + documents("two", 20), 8)
    np.testing.assert_array_equal(np.concatenate([packed.train, packed.eval]), expected)
    with pytest.raises(ValueError, match="no column 'text'.*text_column"):
        load(SourceConfig("e", str(tmp_path / "dir")), tmp_path)


def test_txt_paragraphs_are_documents(tmp_path):
    texts = documents("para", 30)
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(texts) + "\n")
    packed = load(SourceConfig("t", str(path)), tmp_path, eval_fraction=0.0)
    assert len(packed.eval) == 0
    np.testing.assert_array_equal(packed.train, expected_rows(texts, 8))


def test_parquet(tmp_path):
    texts = documents("pq", 30)
    pq.write_table(pa.table({"content": texts, "id": range(30)}), tmp_path / "a.parquet")
    source = SourceConfig("p", str(tmp_path / "a.parquet"), text_column="content")
    packed = load(source, tmp_path, eval_fraction=0.0)
    np.testing.assert_array_equal(packed.train, expected_rows(texts, 8))


def test_cache_is_reused_and_keyed_by_file_and_seq_len(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", documents("doc", 30))
    load(SourceConfig("a", path), tmp_path)
    cache_files = list((tmp_path / "cache" / "packed").glob("a-*.npy"))
    assert len(cache_files) == 1
    mtime = cache_files[0].stat().st_mtime_ns
    load(SourceConfig("a", path), tmp_path)
    assert cache_files[0].stat().st_mtime_ns == mtime
    load(SourceConfig("a", path), tmp_path, seq_len=16)
    write_jsonl(tmp_path / "a.jsonl", documents("changed", 30))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    changed = load(SourceConfig("a", path), tmp_path)
    assert len(list((tmp_path / "cache" / "packed").glob("a-*.npy"))) == 3
    assert bytes(changed.train[0][:7].tolist()) == b"changed"
    assert not list((tmp_path / "cache" / "packed").glob("*.tmp"))


def test_source_too_small_names_the_source(tmp_path):
    tiny = SourceConfig("tiny", write_jsonl(tmp_path / "t.jsonl", ["hello"]))
    with pytest.raises(ValueError, match="'tiny'.*packs into 0 sequences"):
        load(tiny, tmp_path)
    one_row = SourceConfig("one", write_jsonl(tmp_path / "o.jsonl", ["x" * 12]))
    with pytest.raises(ValueError, match="'one'.*packs into 1 sequences"):
        load(one_row, tmp_path)


def test_mixed_formats_in_a_directory(tmp_path):
    write_jsonl(tmp_path / "dir" / "a.jsonl", ["a"])
    (tmp_path / "dir" / "b.txt").write_text("b")
    with pytest.raises(ValueError, match="mixes file formats"):
        load(SourceConfig("m", str(tmp_path / "dir")), tmp_path)
