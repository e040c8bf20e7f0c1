"""The global sample stream: one infinite deterministic sequence of samples shared by all ranks.

Global step s consumes the next `global_batch_size` samples of the stream, whatever the world size;
data-parallel ranks only choose which contiguous slice of that global batch they load. The order
therefore depends on the seed and the number of samples consumed, never on the world size.

Sources are interleaved by weight with Megatron's greedy blending rule: at stream position p the
next sample comes from the source whose delivered count is furthest below `weight * (p + 1)` (ties
go to the lower index), so every prefix of the stream is within about one sample of the target
mix. Within a source, samples come in epochs, each a permutation seeded by (seed, source, epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

STATE_VERSION = 1


@dataclass(frozen=True)
class SampleRef:
    """Where a sample of the stream lives: row `index` of source `source`, drawn in `epoch`."""

    source: int
    epoch: int
    index: int


class SampleStream:
    """Deterministic weighted interleaving of shuffled sources; the state is a few integers."""

    def __init__(
        self, names: list[str], sizes: list[int], weights: list[float], seed: int, seq_len: int
    ):
        assert len(names) == len(sizes) == len(weights) and names, "one size and weight per source"
        assert all(size > 0 for size in sizes) and sum(weights) > 0 and seed >= 0
        self.names = list(names)
        self.sizes = list(sizes)
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.seed = seed
        self.seq_len = seq_len
        self.cursor = 0
        self.delivered = np.zeros(len(names), dtype=np.int64)
        self.epoch = [0] * len(names)
        self.position = [0] * len(names)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def take(self, count: int) -> list[SampleRef]:
        """The next `count` samples of the stream; advances the stream past them."""
        return [self._take_one() for _ in range(count)]

    def sample_id(self, ref: SampleRef) -> str:
        """Stable, human-readable id, e.g. "prose/e0/1234"."""
        return f"{self.names[ref.source]}/e{ref.epoch}/{ref.index}"

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Training tokens delivered so far per source (seq_len tokens per sample)."""
        return {name: int(n) * self.seq_len for name, n in zip(self.names, self.delivered)}

    def _take_one(self) -> SampleRef:
        deficit = self.weights * (self.cursor + 1) - self.delivered
        source = int(np.argmax(deficit))  # the first maximum, i.e. ties go to the lower index
        if self.position[source] == self.sizes[source]:
            self.epoch[source] += 1
            self.position[source] = 0
        ref = SampleRef(
            source, self.epoch[source], int(self._permutation(source)[self.position[source]])
        )
        self.position[source] += 1
        self.delivered[source] += 1
        self.cursor += 1
        return ref

    def _permutation(self, source: int) -> np.ndarray:
        epoch = self.epoch[source]
        cached = self._permutations.get(source)
        if cached is None or cached[0] != epoch:
            name_key = int(hashlib.sha256(self.names[source].encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng([self.seed, name_key, epoch])
            cached = (epoch, rng.permutation(self.sizes[source]))
            self._permutations[source] = cached
        return cached[1]

    def state_dict(self) -> dict:
        """JSON-able position of the stream; independent of the world size."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "cursor": self.cursor,
            # JSON writers may sort keys; the order of sources shapes the mix, so say it.
            "source_order": list(self.names),
            "sources": {
                name: {
                    "delivered": int(self.delivered[i]),
                    "epoch": self.epoch[i],
                    "position": self.position[i],
                    "num_samples": self.sizes[i],
                }
                for i, name in enumerate(self.names)
            },
            "tokens_by_source": self.tokens_by_source,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was saved. Raises ValueError when it cannot."""
        saved_names = list(state["source_order"])
        if saved_names != self.names:
            raise ValueError(
                f"data state was saved for sources {saved_names}, but data.sources names "
                f"{self.names}; a phase with new sources must start a fresh data stream"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, not {self.seed}")
        for i, name in enumerate(self.names):
            saved = state["sources"][name]
            if saved["num_samples"] != self.sizes[i]:
                raise ValueError(
                    f"data source {name!r} now packs into {self.sizes[i]} training sequences, "
                    f"but the saved data state had {saved['num_samples']}; its data changed"
                )
            assert 0 <= saved["position"] <= self.sizes[i], f"corrupt data state for {name!r}"
        self.cursor = int(state["cursor"])
        self.delivered = np.array(
            [state["sources"][name]["delivered"] for name in self.names], dtype=np.int64
        )
        self.epoch = [int(state["sources"][name]["epoch"]) for name in self.names]
        self.position = [int(state["sources"][name]["position"]) for name in self.names]
        self._permutations.clear()
        assert int(self.delivered.sum()) == self.cursor, "corrupt data state: counts != cursor"
