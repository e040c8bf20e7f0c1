"""The trainer's use of the memory tier (checkpointing.snapshot): snapshot every
`checkpoint.interval` steps, let the keeper persist every `checkpoint.persist_interval` steps,
restore from whichever tier is newest, and turn SIGTERM into a final save at a step boundary.

Snapshots receives the `TrainState` and reads it; `Checkpointer` calls `restore`, `preempted`,
`after_step` and `finish`; Trainer.train_step calls `before_optimizer_step`. The keeper is found
through the environment `perennial train` sets.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from checkpointing import LoadResult, collectives, find_loadable
from checkpointing.model_state import OptimizerValues
from checkpointing.snapshot import SnapshotEngine, faults
from trainer.distributed import say

if TYPE_CHECKING:
    from checkpointing import Stacked
    from trainer.config import CheckpointConfig
    from trainer.state import TrainState

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: state is saved, requeue the job
ENV_SHM_ROOT = "PERENNIAL_SHM_ROOT"
ENV_KEEPERS = "PERENNIAL_KEEPERS"
ENV_NODE_INDEX = "PERENNIAL_NODE_INDEX"
ENV_RUN_ID = "PERENNIAL_RUN_ID"


class Preempted(SystemExit):
    CODE = PREEMPTED_EXIT_CODE

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class Snapshots:
    def __init__(self, state: TrainState, cfg: CheckpointConfig, layouts: list[Stacked]):
        self.state = state
        self.cfg = cfg
        self.layouts = layouts
        self.sigterm = False
        self.reported_error: str | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._optimizer_values: OptimizerValues | None = None
        self.engine = self._build_engine()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _build_engine(self) -> SnapshotEngine | None:
        if self.cfg.replicas not in (0, 1):
            raise ValueError(f"checkpoint.replicas must be 0 or 1, got {self.cfg.replicas}")
        if self.cfg.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.cfg.interval}")
        if not self.cfg.memory_snapshots():
            return None
        if ENV_KEEPERS not in os.environ:
            say(f"checkpoint.interval={self.cfg.interval} needs the keeper that "
                "`perennial train` starts; memory snapshots are off")
            return None
        keepers = os.environ[ENV_KEEPERS].split(",")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        position = local_rank * len(keepers) // local_world  # simulated nodes split the ranks
        node_index = int(os.environ.get(ENV_NODE_INDEX, 0)) + position
        first_of_keeper = local_rank == -(-position * local_world // len(keepers))
        return SnapshotEngine(keepers[position], os.environ[ENV_SHM_ROOT], node_index,
                              layouts=self.layouts, run_id=os.environ.get(ENV_RUN_ID, ""),
                              lists_node=first_of_keeper)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    # -- hooks ----------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        if self.engine is not None:
            self.engine.wait_copied()

    def restore(self, tensors: dict[str, torch.Tensor]) -> LoadResult | None:
        """The newest memory snapshot at least as new as the newest intact disk checkpoint."""
        if self.engine is None:
            return None
        on_disk = [c.step for c in find_loadable(self.cfg.dir) if c.problem is None]
        memory = self.engine.restore(tensors, newer_than=max(on_disk, default=0) - 1)
        if memory is None:
            return None
        return LoadResult(Path(f"memory:{self.engine.shm_root}"), memory.step,
                          memory.global_state, memory.rank_states)

    def unusable(self) -> list[str]:
        """Memory snapshots the restore found but could not use."""
        return self.engine.restore_skipped if self.engine is not None else []

    def after_step(self) -> bool:
        """Snapshot when due. True when the keeper persists (the trainer skips its own save)."""
        if self.engine is None:
            return False
        step = self.state.step
        persist = step % self.cfg.persist_interval == 0
        if step % self.cfg.interval == 0 or persist:
            tensors, optim_json = self._live_state()
            global_state = self.state.global_state(optim_json)
            self.engine.snapshot(step, tensors, global_state, self.state.rank_state(), persist)
            if self.engine.disabled:  # could not map its memory: disk checkpoints from now on
                self.engine.close()
                self.engine = None
                return False
            self._report_persist_errors()
        rank = self.state.dist.rank
        faults.maybe_pause("step", step, f"rank {rank} after step {step}", rank)
        return True

    def _live_state(self) -> tuple[dict, dict]:
        """The tensors to copy (the live parameters and optimizer state, the same objects every
        step, so gathered once) and this step's optimizer JSON entries."""
        state = self.state
        assert state.deepspeed is None, "config validation refuses snapshots under DeepSpeed"
        if self._tensors is None:
            self._tensors = state.tensors()[0]
            self._optimizer_values = OptimizerValues(state.model, state.optimizer)
        return self._tensors, self._optimizer_values()

    def finish(self) -> bool:
        """Before the final save: let the keeper finish. True (on every rank) when it committed
        this step, so the trainer's own save is skipped."""
        if self.engine is None:
            return False
        try:
            status = self.engine.drain()
        except (OSError, RuntimeError) as err:
            # Under Slurm the keeper gets the job's SIGTERM too and may be gone: save directly.
            print(f"warning: snapshot keeper unavailable ({err}); saving step "
                  f"{self.state.step} to disk directly", file=sys.stderr, flush=True)
            status = {}
        persisted = status.get("persisted_step") == self.state.step
        all_persisted = not collectives.agree_on_problem(None if persisted else "not persisted",
                                                         None)
        self.engine.close()
        self.engine = None
        return all_persisted

    # -- preemption and status ----------------------------------------------------------
    def preempted(self) -> bool:
        """Whether any rank got SIGTERM (collective: every rank calls it after every step)."""
        flag = torch.tensor([int(self.sigterm)])
        if collectives.is_distributed(None):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def counters(self) -> dict:
        """For the step's metrics: snapshots skipped and time waited for a free slot."""
        if self.engine is None:
            return {}
        return {"snapshots_skipped": self.engine.skipped,
                "snapshot_wait_s": round(self.engine.slot_wait_s, 3)}

    def _report_persist_errors(self) -> None:
        status_file = Path(self.engine.shm_root) / f"node{self.engine.node_index}/status.json"
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return
        error, on_disk = status.get("persist_error"), status.get("persisted_step")
        if error and error != self.reported_error:
            print(f"warning: {error}; training goes on with the memory tier (memory at step "
                  f"{self.state.step}, disk at step {on_disk})", file=sys.stderr, flush=True)
        elif not error and self.reported_error:
            print(f"persisting to disk again: step {on_disk} is on disk", file=sys.stderr,
                  flush=True)
        self.reported_error = error
