"""Shared helpers: small local data files and configs that build in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


def save_tiny_hf_tokenizer(directory: Path) -> str:
    """Train a 300-token byte-level BPE locally and save it the way the hub would ship it."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(documents("the quick brown fox", 50), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture
def hf_tokenizer_dir(tmp_path) -> str:
    return save_tiny_hf_tokenizer(tmp_path / "tokenizer")
