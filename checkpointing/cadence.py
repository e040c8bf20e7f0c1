"""SaveCadence: non-blocking disk saves as often as a throughput budget allows.

Any loop without a keeper can use it:

    cadence = SaveCadence(manager, budget=0.01)
    for step in ...:
        train_step()
        if cadence.due(step):
            cadence.save(step, tensors, global_state, rank_state)

A save costs the step its stall (waiting for the previous commit + the copy into host buffers)
and, meanwhile, the CPU time of the background write. After each save the cadence sets the
next one `ceil(cost / (budget * step_time))` steps later (at least 1, at most
`max_interval`), with cost and step time agreed across ranks (their maximum), so every rank
decides the same steps without a per-step collective.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

from checkpointing import collectives
from checkpointing.manager import CheckpointManager


class SaveCadence:
    def __init__(
        self,
        manager: CheckpointManager,
        budget: float = 0.01,
        first_step: int = 10,
        max_interval: int = 1_000_000,
    ) -> None:
        if not 0 <= budget < 1:
            raise ValueError(f"save budget must be in [0, 1), got {budget}")
        self.manager = manager
        self.budget = budget
        self.max_interval = max(1, max_interval)
        self.next_step = first_step
        self.interval = first_step
        self._last: tuple[int, float] | None = None  # (step, time) when the last save returned

    def due(self, step: int) -> bool:
        """Whether `step` should be saved; never with budget 0 (the caller's own steps only)."""
        return self.budget > 0 and step >= self.next_step

    def save(self, step: int, tensors: dict[str, torch.Tensor], *state: dict[str, Any]) -> None:
        """Collective: `manager.save(step, tensors, global_state, rank_state, blocking=False)`,
        then the step of the next save."""
        start = time.perf_counter()
        self.manager.save(step, tensors, *state, blocking=False)
        end = time.perf_counter()
        cost = (end - start) + self.manager.last_background_cpu_s
        if self._last is None or step <= self._last[0]:
            step_s = 0.0  # no measured training step yet: keep the first interval
        else:
            step_s = (start - self._last[1]) / (step - self._last[0])
        self._last = (step, end)
        cost, step_s = _agreed_max([cost, step_s], self.manager.group)
        if step_s > 0 and self.budget > 0:
            wanted = math.ceil(cost / (self.budget * step_s))
            self.interval = min(max(1, wanted), self.max_interval)
        self.next_step = step + self.interval


def _agreed_max(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    if not collectives.is_distributed(group):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collectives._device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()
