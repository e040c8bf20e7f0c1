"""Data hyperparameters (`data.*`).

Plain dataclasses so that omegaconf can use them as structured configs. `validate()` only checks
the values and the existence of files; it builds nothing, so it can run before any process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.data.reading import ACCEPTED_FILE_SUFFIXES, HF_PREFIX

BUILTIN_CORPORA = ("stdlib:prose", "stdlib:code")


@dataclass
class SourceConfig:
    name: str = ""
    """Unique name of the source; keys the metrics (tokens_by_source, eval loss per source)."""
    path: str = ""
    """A directory written by `perennial data prepare` (token shards); a local file or directory
    of .jsonl/.json/.txt/.parquet files, each maybe .gz or .zst compressed; a `save_to_disk`
    directory; `hf:NAME[:CONFIG]`, a dataset in the local Hugging Face cache (never downloaded);
    or a built-in corpus: `stdlib:prose` (Python's documentation prose) or `stdlib:code` (the
    stdlib's source code). Raw sources are prepared once into cache_dir."""
    weight: float = 1.0
    """Share of the training tokens drawn from this source, normalised over all sources;
    0 keeps the source for evaluation only."""
    text_column: str = "text"
    """Column holding the document text in .jsonl/.json/.parquet files; in .txt files every
    blank-line separated paragraph is a document."""


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(name="prose", path="stdlib:prose", weight=1.0)]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_default_sources)
    """Training sources, mixed by weight into one deterministic sample stream."""
    seq_len: int = 128
    """Tokens per training sequence (inputs and targets are each seq_len long)."""
    tokenizer: str = "bytes"
    """`bytes` (byte-level, built in) or a local directory holding a Hugging Face tokenizer."""
    eval_fraction: float = 0.02
    """Share of each source's packed sequences held out for evaluation (the last ones, >= 1)."""
    eval_batches: int = 4
    """Micro batches evaluated per source, in total over the data-parallel group."""
    cache_dir: str = ""
    """Where built corpora and packed token caches go; empty means ~/.cache/perennial."""
    num_proc: int = 1
    """Processes tokenising a raw source the first time it is used (its cache is then reused)."""
    prefetch: int = 2
    """Steps of batches read ahead in a background thread (pinned memory on CUDA); 0: none."""
    record_sample_ids: bool = False
    """Debugging/testing: expose the global sample ids of every step as `last_sample_ids`."""

    def resolved_cache_dir(self) -> str:
        return os.path.expanduser(self.cache_dir or "~/.cache/perennial")

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources must name at least one source")
        names: set[str] = set()
        for i, source in enumerate(self.sources):
            _validate_source(source, f"data.sources[{i}]")
            if source.name in names:
                raise ValueError(f"data.sources[{i}].name: duplicate source name {source.name!r}")
            names.add(source.name)
        if sum(source.weight for source in self.sources) <= 0:
            raise ValueError("data.sources: the weights sum to zero")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_batches < 0:
            raise ValueError(f"data.eval_batches must be >= 0, got {self.eval_batches}")
        if self.num_proc < 1 or self.prefetch < 0:
            raise ValueError(
                f"data.num_proc must be >= 1 and data.prefetch >= 0, got {self.num_proc} and "
                f"{self.prefetch}"
            )
        if self.tokenizer != "bytes" and not os.path.isdir(os.path.expanduser(self.tokenizer)):
            raise ValueError(
                f"data.tokenizer: {self.tokenizer} is neither 'bytes' nor an existing directory"
            )


def _validate_source(source: SourceConfig, key: str) -> None:
    if not source.name or "/" in source.name:
        raise ValueError(f"{key}.name must be a non-empty name without '/', got {source.name!r}")
    if not source.weight >= 0:  # also rejects NaN
        raise ValueError(f"{key}.weight must be >= 0, got {source.weight}")
    if not source.text_column:
        raise ValueError(f"{key}.text_column must not be empty")
    if source.path.startswith("stdlib:"):
        if source.path not in BUILTIN_CORPORA:
            raise ValueError(
                f"{key}.path: unknown built-in corpus {source.path!r}; available: {BUILTIN_CORPORA}"
            )
        return
    if source.path.startswith(HF_PREFIX):  # looked up in the local cache when loaded
        return
    path = os.path.expanduser(source.path)
    if not source.path or not os.path.exists(path):
        raise ValueError(f"{key}.path: {source.path or '(empty)'} does not exist")
    if os.path.isfile(path) and not path.endswith(ACCEPTED_FILE_SUFFIXES):
        raise ValueError(f"{key}.path: {source.path} is not one of {ACCEPTED_FILE_SUFFIXES}")
