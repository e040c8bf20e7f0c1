"""Load a source, tokenise it, pack it into fixed-length sequences, cache the result as .npy.

Documents are concatenated, each followed by EOS, and cut into rows of `seq_len + 1` tokens
(inputs are `row[:-1]`, targets `row[1:]`); the remainder is dropped. The last `eval_fraction` of
the rows (at least one) is held out for evaluation. The cache is keyed by the source files' sizes
and mtimes, the tokenizer and seq_len, and is memory-mapped when loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from trainer.data.cache import build_once, stable_hash
from trainer.data.config import DATA_FILE_SUFFIXES, SourceConfig
from trainer.data.corpus import builtin_corpus_path
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer

PACKED_FORMAT_VERSION = 1
BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


@dataclass
class PackedSource:
    """One source's packed sequences: `train` and `eval` are [n, seq_len + 1] token arrays."""

    name: str
    train: np.ndarray
    eval: np.ndarray


def load_packed_source(
    source: SourceConfig,
    tokenizer: ByteTokenizer | HFTokenizer,
    seq_len: int,
    eval_fraction: float,
    cache_dir: str,
) -> PackedSource:
    """Pack `source` (from the cache when possible) and split off its held-out rows."""
    path = source.path
    if path.startswith("stdlib:"):
        path = builtin_corpus_path(path, cache_dir)
    files = source_files(os.path.expanduser(path))
    key = stable_hash(
        {
            "version": PACKED_FORMAT_VERSION,
            "files": [(file, os.path.getsize(file), os.stat(file).st_mtime_ns) for file in files],
            "tokenizer": tokenizer.identity,
            "seq_len": seq_len,
            "text_column": source.text_column,
        }
    )
    cache_file = os.path.join(cache_dir, "packed", f"{source.name}-{key}.npy")
    hf_cache = os.path.join(cache_dir, "hf-datasets")

    def build(tmp: str) -> None:
        rows = pack_tokens(tokenize_files(files, source, tokenizer, hf_cache), seq_len)
        with open(tmp, "wb") as handle:
            np.save(handle, rows.astype(token_dtype(tokenizer.vocab_size)))

    rows = np.load(build_once(cache_file, build), mmap_mode="r")
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if len(rows) <= n_eval:
        raise ValueError(
            f"data source {source.name!r} ({source.path}) packs into {len(rows)} sequences of "
            f"{seq_len + 1} tokens, too few to train on after holding out {n_eval} for evaluation"
        )
    return PackedSource(
        source.name, train=rows[: len(rows) - n_eval], eval=rows[len(rows) - n_eval :]
    )


def source_files(path: str) -> list[str]:
    """The data files of a file or directory source, sorted, all of one format."""
    if os.path.isfile(path):
        files = [os.path.abspath(path)]
    else:
        files = sorted(
            os.path.abspath(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(DATA_FILE_SUFFIXES)
        )
    if not files:
        raise ValueError(f"no {DATA_FILE_SUFFIXES} files under {path}")
    builders = {builder_for(file) for file in files}
    if len(builders) > 1:
        raise ValueError(f"{path} mixes file formats {sorted(builders)}; use one source per format")
    return files


def builder_for(file: str) -> str:
    for suffix, builder in BUILDER_BY_SUFFIX.items():
        if file.endswith(suffix):
            return builder
    raise ValueError(f"{file}: unsupported file type; expected one of {DATA_FILE_SUFFIXES}")


def tokenize_files(
    files: list[str], source: SourceConfig, tokenizer: ByteTokenizer | HFTokenizer, hf_cache: str
) -> np.ndarray:
    """All documents' tokens, each document followed by EOS, as one flat array."""
    from datasets import load_dataset

    builder = builder_for(files[0])
    # .txt: blank-line separated paragraphs are the documents.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    dataset = load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **options)
    column = "text" if builder == "text" else source.text_column
    if column not in dataset.column_names:
        raise ValueError(
            f"data source {source.name!r}: no column {column!r} in {source.path} "
            f"(columns: {dataset.column_names}); set its text_column"
        )
    eos = np.array([tokenizer.eos_id], dtype=np.int64)

    def tokenize(batch: dict[str, list]) -> dict[str, list[np.ndarray]]:
        texts = [text or "" for text in batch[column]]
        return {"input_ids": [np.concatenate([ids, eos]) for ids in tokenizer.encode_batch(texts)]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
        desc=f"tokenising {source.name}",
    )
    return pc.list_flatten(tokenized.data.column("input_ids")).to_numpy()


def pack_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a flat token array into [n, seq_len + 1] rows, dropping the remainder."""
    n_rows = len(tokens) // (seq_len + 1)
    return tokens[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1)


def token_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
