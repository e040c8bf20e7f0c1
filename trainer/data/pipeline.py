"""The data object the trainer uses: `build_data(...)` then `next_step_batches(dp_rank, dp_size)`.

Every rank builds the same `Data` (the packed caches are built once and shared through the file
system) and advances the same global sample stream; a rank only loads its slice of each global
batch. Evaluation batches are padded with IGNORE_INDEX targets so that every rank runs the same
number of equally shaped micro batches whatever the world size, and the evaluated sample set does
not depend on it: reduce eval losses as sum(loss over targets != IGNORE_INDEX) / count, all-reduced.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from trainer.data.config import DataConfig
from trainer.data.packed import PackedSource, load_packed_source
from trainer.data.prefetch import Prefetcher
from trainer.data.stream import SampleRef, SampleStream
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

IGNORE_INDEX = -100
"""Target value of evaluation padding; matches `F.cross_entropy`'s default ignore_index."""

Batch = tuple[torch.Tensor, torch.Tensor]


class Data:
    """Packed sources plus the global sample stream. Build it with `build_data`.

    The stream runs `cfg.prefetch` steps ahead of the trainer so that their rows load in the
    background; `state_dict` and `tokens_by_source` describe the steps handed out so far."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: ByteTokenizer | HFTokenizer,
        sources: list[PackedSource],
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        pin_memory: bool = False,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources = sources
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.stream = SampleStream(
            names=[source.name for source in sources],
            sizes=[len(source.train) for source in sources],
            weights=[source_cfg.weight for source_cfg in cfg.sources],
            seed=seed,
            seq_len=cfg.seq_len,
        )
        self._last_refs: list[SampleRef] = []
        # Steps taken from the stream but not handed out yet: (stream state before, refs).
        self._ahead: deque[tuple[dict, list[SampleRef]]] = deque()
        self._prefetch: Prefetcher[list[Batch]] = Prefetcher(self._load, cfg.prefetch)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Cumulative training tokens per source name (seq_len per sample)."""
        return dict(self.state_dict()["tokens_by_source"])

    def next_step_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        """This rank's micro batches of the next global batch, as (inputs, targets) int64 tensors
        of shape [micro_batch_size, seq_len]. Advances the stream by one global batch; every rank
        must call it once per step."""
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        per_rank = self.global_batch_size // dp_size
        assert per_rank * dp_size == self.global_batch_size, "global batch not divisible by dp"
        assert per_rank % self.micro_batch_size == 0, "rank batch not divisible by micro batch"
        while len(self._ahead) <= self.cfg.prefetch:
            self._ahead.append((self.stream.state_dict(), self.stream.take(self.global_batch_size)))
        refs = self._ahead.popleft()[1]
        self._last_refs = refs if self.cfg.record_sample_ids else []
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        batches = self._prefetch.get(tuple(refs[mine]))
        self._prefetch.schedule([tuple(step_refs[mine]) for _, step_refs in self._ahead])
        return batches

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
        rows = torch.from_numpy(held_out[: self.cfg.eval_batches * micro].astype(np.int64))
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
        return self._ahead[0][0] if self._ahead else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead.clear()
        self._prefetch.clear()
        self.stream.load_state_dict(state)

    def _load(self, refs: tuple[SampleRef, ...]) -> list[Batch]:
        """Copy the rows of `refs` out of the memory maps into (pinned) micro batches."""
        rows = np.empty((len(refs), self.cfg.seq_len + 1), dtype=np.int64)
        for i, ref in enumerate(refs):
            rows[i] = self.sources[ref.source].train[ref.index]
        batches = _micro_batches(torch.from_numpy(rows), self.micro_batch_size)
        if self.pin_memory:  # host-to-device copies can then overlap compute
            batches = [(inputs.pin_memory(), targets.pin_memory()) for inputs, targets in batches]
        return batches


def build_data(
    data_cfg: DataConfig,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    model_vocab_size: int = 0,
    pin_memory: bool = False,
) -> Data:
    """Open every source (preparing raw ones into the cache first), check them against the
    tokenizer and `model_vocab_size` (0: derived from the tokenizer), and start the sample
    stream at step 0.

    Safe to call on every rank at once: caches are prepared by one process under a file lock
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
    if model_vocab_size and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"data.tokenizer {data_cfg.tokenizer} has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size ({model_vocab_size})"
        )
    cache_dir = data_cfg.resolved_cache_dir()
    sources = [
        load_packed_source(source, data_cfg.tokenizer, tokenizer, data_cfg.seq_len,
                           data_cfg.eval_fraction, cache_dir, data_cfg.num_proc)
        for source in data_cfg.sources
    ]
    return Data(data_cfg, tokenizer, sources, seed, global_batch_size, micro_batch_size,
                pin_memory)


def _micro_batches(rows: torch.Tensor, micro_batch_size: int) -> list[Batch]:
    return [
        (chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
        for chunk in torch.split(rows, micro_batch_size)
    ]
