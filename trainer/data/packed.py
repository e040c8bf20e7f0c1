"""A source's tokens as fixed-length training rows, read lazily from token shards.

A prepared directory (`perennial data prepare`) is read as it is. Any other source (files,
`save_to_disk` directories, `hf:` names, built-in corpora) is prepared once into
`<cache_dir>/prepared/<name>-<key>/` by `data.num_proc` processes, keyed by the source files'
sizes and mtimes, the tokenizer and the text column; concurrent ranks wait for one preparer.

The shards' token stream (documents framed by BOS/EOS, in order) is cut into rows of
`seq_len + 1` tokens (inputs are `row[:-1]`, targets `row[1:]`); the remainder is dropped. The
last `eval_fraction` of the rows (at least one) is held out for evaluation. Rows are copied out
of the memory maps when a batch needs them, so memory does not grow with the corpus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from trainer.data.cache import stable_hash
from trainer.data.config import SourceConfig
from trainer.data.corpus import builtin_corpus_path
from trainer.data.prepare import prepare
from trainer.data.reading import resolve_raw_source
from trainer.data.shards import MANIFEST, TokenShards, is_prepared_dir
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer

PACKED_FORMAT_VERSION = 2  # 2: documents are BOS ... EOS, read from token shards


@dataclass
class PackedRows:
    """Rows [start, stop) of the `row_len`-token rows cut from `shards`."""

    shards: TokenShards
    row_len: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.row_len)

    @property
    def dtype(self) -> np.dtype:
        return self.shards.dtype

    def __getitem__(self, index: int | slice) -> np.ndarray:
        """One row, or a slice of rows as a [n, row_len] array."""
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            assert step == 1, "row slices are contiguous"
            last = max(first, last)
            tokens = self.shards.read((self.start + first) * self.row_len,
                                      (self.start + last) * self.row_len)
            return tokens.reshape(last - first, self.row_len)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        row = self.start + index % len(self)
        return self.shards.read(row * self.row_len, (row + 1) * self.row_len)

    def rows(self, indices: list[int]) -> np.ndarray:
        """The rows at `indices` (any order) as one int64 array [len(indices), row_len]."""
        out = np.empty((len(indices), self.row_len), dtype=np.int64)
        for i, index in enumerate(indices):
            out[i] = self[index]
        return out

    def split(self, n_tail: int) -> tuple[PackedRows, PackedRows]:
        middle = self.stop - n_tail
        return (PackedRows(self.shards, self.row_len, self.start, middle),
                PackedRows(self.shards, self.row_len, middle, self.stop))


@dataclass
class PackedSource:
    """One source's rows of seq_len + 1 tokens: `train` and the held-out `eval`."""

    name: str
    train: PackedRows
    eval: PackedRows
    directory: str


def load_packed_source(
    source: SourceConfig,
    tokenizer_spec: str,
    tokenizer: ByteTokenizer | HFTokenizer,
    seq_len: int,
    eval_fraction: float,
    cache_dir: str,
    num_proc: int = 1,
) -> PackedSource:
    """Open (preparing it first where needed) `source` and split off its held-out rows."""
    directory = shards_directory(source, tokenizer_spec, tokenizer, cache_dir, num_proc)
    shards = TokenShards(directory)
    check_tokenizer(source, shards.manifest, tokenizer_spec, tokenizer)
    rows = PackedRows(shards, seq_len + 1, 0, shards.num_tokens // (seq_len + 1))
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if len(rows) <= n_eval:
        raise ValueError(
            f"data source {source.name!r} ({source.path}) packs into {len(rows)} sequences of "
            f"{seq_len + 1} tokens, too few to train on after holding out {n_eval} for evaluation"
        )
    train, held_out = rows.split(n_eval)
    return PackedSource(source.name, train=train, eval=held_out, directory=directory)


def shards_directory(
    source: SourceConfig,
    tokenizer_spec: str,
    tokenizer: ByteTokenizer | HFTokenizer,
    cache_dir: str,
    num_proc: int,
) -> str:
    """The prepared directory of `source`: its own path, or its cache, built if missing."""
    path = source.path
    if path.startswith("stdlib:"):
        path = builtin_corpus_path(path, cache_dir)
    elif is_prepared_dir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    try:
        raw = resolve_raw_source(path)
        key = stable_hash({
            "version": PACKED_FORMAT_VERSION,
            "source": raw.fingerprint(),
            "tokenizer": tokenizer.identity,
            "text_column": source.text_column,
        })
        directory = os.path.join(cache_dir, "prepared", f"{source.name}-{key}")
        if not os.path.exists(os.path.join(directory, MANIFEST)):
            prepare(path, directory, tokenizer_spec, num_proc, source.text_column)
    except ValueError as error:
        raise ValueError(f"data source {source.name!r}: {error}") from error
    return directory


def check_tokenizer(
    source: SourceConfig,
    manifest: dict,
    tokenizer_spec: str,
    tokenizer: ByteTokenizer | HFTokenizer,
) -> None:
    prepared = manifest["tokenizer"]
    if prepared["identity"] != tokenizer.identity:
        raise ValueError(
            f"data source {source.name!r}: {source.path} was prepared with tokenizer "
            f"{prepared['spec']} ({prepared['identity']}), but data.tokenizer is "
            f"{tokenizer_spec} ({tokenizer.identity}); prepare it again with --tokenizer "
            f"{tokenizer_spec}"
        )
