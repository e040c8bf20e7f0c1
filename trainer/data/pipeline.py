"""The data object the trainer uses: `build_data(...)` then `next_step_batches(dp_rank, dp_size)`.

Every rank builds the same `Data` (the packed caches are built once and shared through the file
system) and advances the same global sample stream; a rank only loads its slice of each global
batch. Evaluation batches are padded with IGNORE_INDEX targets so that every rank runs the same
number of equally shaped micro batches whatever the world size, and the evaluated sample set does
not depend on it: reduce eval losses as sum(loss over targets != IGNORE_INDEX) / count, all-reduced.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.data.config import DataConfig
from trainer.data.packed import PackedSource, load_packed_source
from trainer.data.stream import SampleRef, SampleStream
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

IGNORE_INDEX = -100
"""Target value of evaluation padding; matches `F.cross_entropy`'s default ignore_index."""

Batch = tuple[torch.Tensor, torch.Tensor]


class Data:
    """Packed sources plus the global sample stream. Build it with `build_data`."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: ByteTokenizer | HFTokenizer,
        sources: list[PackedSource],
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources = sources
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.stream = SampleStream(
            names=[source.name for source in sources],
            sizes=[len(source.train) for source in sources],
            weights=[source_cfg.weight for source_cfg in cfg.sources],
            seed=seed,
            seq_len=cfg.seq_len,
        )
        self._last_refs: list[SampleRef] = []

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Cumulative training tokens per source name (seq_len per sample)."""
        return self.stream.tokens_by_source

    def next_step_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        """This rank's micro batches of the next global batch, as (inputs, targets) int64 tensors
        of shape [micro_batch_size, seq_len]. Advances the stream by one global batch; every rank
        must call it once per step."""
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        per_rank = self.global_batch_size // dp_size
        assert per_rank * dp_size == self.global_batch_size, "global batch not divisible by dp"
        assert per_rank % self.micro_batch_size == 0, "rank batch not divisible by micro batch"
        refs = self.stream.take(self.global_batch_size)
        self._last_refs = refs if self.cfg.record_sample_ids else []
        rows = self._gather(refs[dp_rank * per_rank : (dp_rank + 1) * per_rank])
        return _micro_batches(rows, self.micro_batch_size)

    @property
    def last_sample_ids(self) -> list[str]:
        """Ids of the whole last global batch (the same on every rank), e.g. "prose/e0/17"."""
        if not self.cfg.record_sample_ids:
            raise RuntimeError("sample ids are recorded only with data.record_sample_ids=true")
        return [self.stream.sample_id(ref) for ref in self._last_refs]

    def eval_batches(self, source_name: str, dp_rank: int, dp_size: int) -> list[Batch]:
        """This rank's share of the held-out micro batches of `source_name`.

        The evaluated rows are the first `eval_batches * micro_batch_size` held-out rows of the
        source, whatever dp_size; every rank gets the same number of micro batches, padded with
        IGNORE_INDEX targets (possibly padding only)."""
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if source_name not in self.source_names:
            raise ValueError(f"unknown data source {source_name!r}; sources: {self.source_names}")
        held_out = self.sources[self.source_names.index(source_name)].eval
        micro = self.micro_batch_size
        rows = torch.from_numpy(np.asarray(held_out[: self.cfg.eval_batches * micro], np.int64))
        per_rank = math.ceil(math.ceil(len(rows) / micro) / dp_size) * micro
        if per_rank == 0:  # eval_fraction or eval_batches is 0
            return []
        inputs = torch.full((per_rank * dp_size, self.cfg.seq_len), self.tokenizer.eos_id)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        inputs[: len(rows)], targets[: len(rows)] = rows[:, :-1], rows[:, 1:]
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return list(zip(torch.split(inputs[mine], micro), torch.split(targets[mine], micro)))

    def state_dict(self) -> dict:
        """JSON-able stream position; load it under any data-parallel size."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def _gather(self, refs: list[SampleRef]) -> torch.Tensor:
        rows = np.stack([self.sources[ref.source].train[ref.index] for ref in refs])
        return torch.from_numpy(rows.astype(np.int64))


def build_data(
    data_cfg: DataConfig, seed: int, global_batch_size: int, micro_batch_size: int
) -> Data:
    """Load, tokenise and pack every source (cached), and start the sample stream at step 0.

    Safe to call on every rank at once: cache files are built by one process under a file lock
    and published by atomic rename."""
    data_cfg.validate()
    if micro_batch_size <= 0 or global_batch_size <= 0:
        raise ValueError("global_batch_size and micro_batch_size must be > 0")
    if global_batch_size % micro_batch_size:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be divisible by "
            f"micro_batch_size ({micro_batch_size})"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    cache_dir = data_cfg.resolved_cache_dir()
    sources = [
        load_packed_source(source, tokenizer, data_cfg.seq_len, data_cfg.eval_fraction, cache_dir)
        for source in data_cfg.sources
    ]
    return Data(data_cfg, tokenizer, sources, seed, global_batch_size, micro_batch_size)


def _micro_batches(rows: torch.Tensor, micro_batch_size: int) -> list[Batch]:
    return [
        (chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
        for chunk in torch.split(rows, micro_batch_size)
    ]
