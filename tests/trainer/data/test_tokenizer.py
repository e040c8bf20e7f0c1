"""Byte-level tokenizer and a Hugging Face tokenizer loaded from a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data import ByteTokenizer, DataConfig, SourceConfig, build_data, build_tokenizer

from .conftest import documents, write_jsonl


def test_byte_tokenizer_round_trip():
    tokenizer = build_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (258, 256, 257)
    text = "héllo wörld ✓ def f(x):\n\treturn x"
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text
    assert [list(row) for row in tokenizer.encode_batch(["ab", ""])] == [[97, 98], []]


def test_hf_tokenizer_from_local_dir(hf_tokenizer_dir):
    tokenizer = build_tokenizer(hf_tokenizer_dir)
    assert tokenizer.vocab_size == 300
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    text = "the quick brown fox jumps"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text) and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
    assert [list(row) for row in tokenizer.encode_batch([text])] == [ids]
    assert tokenizer.identity == build_tokenizer(hf_tokenizer_dir).identity


def test_build_data_with_hf_tokenizer(hf_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "fox.jsonl", documents("the quick brown fox", 80))
    cfg = DataConfig(
        sources=[SourceConfig("fox", path)],
        seq_len=8,
        tokenizer=hf_tokenizer_dir,
        cache_dir=str(tmp_path / "cache"),
    )
    data = build_data(cfg, seed=0, global_batch_size=4, micro_batch_size=2)
    assert data.vocab_size == 300
    (inputs, targets), _ = data.next_step_batches(0, 1)
    assert inputs.shape == (2, 8) and int(inputs.max()) < 300
    assert str(data.sources[0].train.dtype) == "uint16"
    bytes_cfg = DataConfig(sources=cfg.sources, seq_len=8, cache_dir=cfg.cache_dir)
    bytes_data = build_data(bytes_cfg, seed=0, global_batch_size=4, micro_batch_size=2)
    assert len(list(Path(cfg.cache_dir, "prepared").glob("fox-*/manifest.json"))) == 2
    assert len(bytes_data.sources[0].train) > len(data.sources[0].train)


def test_missing_tokenizer_dir_is_a_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer(str(tmp_path / "empty"))
