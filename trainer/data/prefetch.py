"""Load the next steps' batches in a background thread while the current step computes.

Loads are keyed by the samples they hold: a `get` for a key that was scheduled returns the
background result, anything else (the stream was reset by `load_state_dict`) is loaded in the
caller's thread, so prefetching never changes which samples a step sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    def __init__(self, load: Callable[[Hashable], T], depth: int):
        self.load = load
        self.depth = depth
        self.pending: deque[tuple[Hashable, Future]] = deque()
        self.executor: ThreadPoolExecutor | None = None  # started by the first schedule

    def get(self, key: Hashable) -> T:
        while self.pending and self.pending[0][0] != key:
            self.pending.popleft()[1].cancel()
        if self.pending:
            return self.pending.popleft()[1].result()
        return self.load(key)

    def schedule(self, keys: list[Hashable]) -> None:
        """Start loading `keys` (the next steps, in order) that are not loading yet."""
        if not self.depth:
            return
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="perennial-prefetch")
        queued = [key for key, _ in self.pending]
        for key in keys[: self.depth]:
            if key not in queued:
                self.pending.append((key, self.executor.submit(self.load, key)))

    def clear(self) -> None:
        while self.pending:
            self.pending.popleft()[1].cancel()
