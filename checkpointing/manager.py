"""CheckpointManager: save sharded, load into any parallel layout, fall back past damage."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from checkpointing import collectives
from checkpointing.commit import (
    commit,
    find_loadable,
    is_checkpoint_dir,
    new_temp_dir_name,
    prune,
    remove_stale_temp_dirs,
    resolve_root,
    structural_problem,
)
from checkpointing.format import (
    DEFAULT_BLOCK_SIZE,
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointDamaged,
    read_index,
    read_json,
    step_dir_name,
)
from checkpointing.layout import (
    Layout,
    ShardView,
    to_logical,
    validate_request,
    zero_padding,
)
from checkpointing.staging import HostBuffers
from checkpointing.storage import (
    SafetensorsShardWriter,
    ShardViewLoadPlanner,
    ShardViewSavePlanner,
    VerifyingShardReader,
)


@dataclass
class LoadResult:
    """What a load restored. `rank_states[r]` is the rank_state saved by rank r."""

    path: Path
    step: int
    global_state: dict[str, Any]
    rank_states: list[dict[str, Any]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    bytes_read: int = 0
    """Tensor bytes this rank read (and verified) from the loaded checkpoint."""


class CheckpointManager:
    """Saves and loads universal checkpoints under `root_dir` (see docs/checkpoint-format.md).

    Uses `process_group` (default: the default group when initialised, else single-process).
    `layouts` declares tensors whose in-memory form differs from the saved logical form.
    `read_threads`: threads reading and verifying on each rank (0: its cores, at most 8).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        keep: int = 3,
        layouts: Sequence[Layout] = (),
        block_size: int = DEFAULT_BLOCK_SIZE,
        process_group: dist.ProcessGroup | None = None,
        read_threads: int = 0,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if block_size <= 0 or block_size % 64:
            raise ValueError(f"block_size must be a positive multiple of 64, got {block_size}")
        self.root = Path(root_dir)
        self.keep = keep
        self.layouts = tuple(layouts)
        self.block_size = block_size
        self.group = process_group
        self.read_threads = read_threads  # 0: default_threads()
        self._bytes_read = 0
        self._host_buffers = HostBuffers()
        self._pending: Future[Path] | None = None
        self._async_group: dist.ProcessGroup | None = None
        self.last_background_cpu_s = 0.0
        """CPU seconds the last finished background save took (what it stole from training)."""

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        global_state: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
        blocking: bool = True,
    ) -> Path | None:
        """Collective: write `tensors` (plain or DTensor) and JSON state as checkpoint `step`.

        Every rank passes its own view of the same keys; replicated tensors are written once.
        `global_state` is taken from rank 0, `rank_state` from every rank. Returns the committed
        directory after it is durable and `latest` points at it.

        `blocking=False`: copy this rank's shards into host buffers reused across saves and
        return None at once; a background thread writes, fsyncs and commits (over a process
        group of its own). The next save, load or `wait()` first waits for that commit and
        raises its error, if any. A crash before the commit leaves the previous checkpoint.
        """
        self.wait()
        _check_tensors(tensors)
        global_state = _checked_json(global_state or {}, "global_state")
        rank_state = _checked_json(rank_state or {}, "rank_state")
        logical, layout_records = to_logical(tensors, self.layouts)
        if blocking:
            return self._write(self.group, step, logical, layout_records, global_state, rank_state)
        group = self._background_group()
        staged = self._host_buffers.stage(logical)
        self._pending = _in_daemon_thread(
            self._write_in_background, group, step, staged, layout_records, global_state, rank_state
        )
        return None

    def _write_in_background(self, *args) -> Path:
        start = time.thread_time()
        try:
            return self._write(*args)
        finally:
            self.last_background_cpu_s = time.thread_time() - start

    def wait(self) -> Path | None:
        """Wait for the pending non-blocking save; its committed directory (None if none).

        Raises the error the background save hit, once.
        """
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        """Wait for the pending save (kept for symmetry with other checkpointers)."""
        self.wait()

    def _background_group(self) -> dist.ProcessGroup | None:
        """A gloo group for background saves, so they never interleave with the caller's
        collectives on the training group (created collectively on the first such save)."""
        if self._async_group is None and collectives.is_distributed(self.group):
            ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
            self._async_group = dist.new_group(ranks, backend="gloo")
        return self._async_group if self._async_group is not None else self.group

    def _write(self, group, step, logical, layout_records, global_state, rank_state) -> Path:
        """Collective over `group`: write the shards, the index and state, then commit."""
        rank_states = collectives.all_gather_strings(json.dumps(rank_state), group)
        temp_name = collectives.broadcast_string(new_temp_dir_name(step), group)
        temp_dir = self.root / temp_name
        if collectives.rank(group) == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_dirs(self.root, keep_name=temp_name)
            temp_dir.mkdir()
        collectives.barrier(group)
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": collectives.world_size(group),
            "global_state": global_state,
            "rank_states": [json.loads(s) for s in rank_states],
        }
        writer = SafetensorsShardWriter(temp_dir, step, self.block_size, layout_records, state)
        # Returns on every rank only after all shards are fsynced and index.json is written.
        try:
            with self._dcp_quiet():
                dcp.save(logical, storage_writer=writer, planner=ShardViewSavePlanner(),
                         **self._dcp(group))
            return self._commit(group, temp_dir, step)
        except (Exception, CheckpointException) as err:
            if collectives.rank(group) == 0:  # at once: a full disk needs the space back
                shutil.rmtree(temp_dir, ignore_errors=True)
            if isinstance(err, CheckpointException):  # DCP's wrapper of every rank's error
                rank, cause = sorted(err.failures.items())[0]
                raise RuntimeError(f"saving step {step} failed on rank {rank}: {cause}") from None
            raise

    def _commit(self, group, temp_dir: Path, step: int) -> Path:
        problem = None
        if collectives.rank(group) == 0:
            try:
                commit(self.root, temp_dir, step)
                prune(self.root, self.keep)
            except OSError as err:
                problem = f"committing {temp_dir} failed: {err}"
        problem = collectives.agree_on_problem(problem, group)
        if problem:
            raise RuntimeError(problem)
        return self.root / step_dir_name(step)

    def load_latest(self, tensors: dict[str, torch.Tensor]) -> LoadResult | None:
        """Collective: load the newest intact checkpoint under the root into `tensors` in place.

        Damaged checkpoints (failing the structural check on any rank, or a missing file, short
        read or checksum mismatch on any rank) are skipped and listed in `.skipped` with the
        reason. Returns None when the root holds no committed checkpoint; raises
        CheckpointDamaged when it holds some but none is intact (then `tensors` may be partly
        overwritten, so the caller must not go on with them).
        """
        self.wait()
        return self._load_newest(self.root, tensors)

    def load(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> LoadResult | None:
        """Collective: load a checkpoint dir (damage raises ValueError), or the newest intact one
        under a checkpoint root / run dir (like load_latest).

        Only the keys of `tensors` are loaded (e.g. pass only model tensors for a warm start);
        a requested key missing from the checkpoint raises ValueError naming it.
        """
        self.wait()
        path = Path(path)
        if not is_checkpoint_dir(path):
            return self._load_newest(resolve_root(path), tensors)
        problem = self._agree(structural_problem(path)) or self._read_into(path, tensors)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        return self._result(path, [])

    def _load_newest(self, root: Path, tensors: dict[str, torch.Tensor]) -> LoadResult | None:
        names = collectives.broadcast_string(
            json.dumps([c.path.name for c in find_loadable(root)]), self.group
        )
        skipped: list[tuple[Path, str]] = []
        for path in (root / name for name in json.loads(names)):
            problem = self._agree(structural_problem(path)) or self._read_into(path, tensors)
            if problem is None:
                return self._result(path, skipped)
            skipped.append((path, problem))
        if skipped:
            reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
            raise CheckpointDamaged(f"no intact checkpoint under {root}: {reasons}")
        return None

    def _read_into(self, path: Path, tensors: dict[str, torch.Tensor]) -> str | None:
        index = read_index(path)
        logical, declared = to_logical(tensors, self.layouts)
        validate_request(f"checkpoint {path}", index, logical, declared)
        zero_padding(tensors, self.layouts)
        reader = VerifyingShardReader(path, index, self.read_threads)
        with self._dcp_quiet():
            planner = ShardViewLoadPlanner()
            dcp.load(logical, storage_reader=reader, planner=planner, **self._dcp(self.group))
        self._bytes_read = reader.bytes_read
        return self._agree(reader.damage)

    def _result(self, path: Path, skipped: list[tuple[Path, str]]) -> LoadResult:
        state = read_json(path / STATE_FILE)
        return LoadResult(
            path=path,
            step=int(state["step"]),
            global_state=state["global_state"],
            rank_states=state["rank_states"],
            skipped=skipped,
            bytes_read=self._bytes_read,
        )

    def _agree(self, problem: str | None) -> str | None:
        return collectives.agree_on_problem(problem, self.group)

    @staticmethod
    @contextlib.contextmanager
    def _dcp_quiet():
        with warnings.catch_warnings():  # single-process use is intended, not a misconfiguration
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    @staticmethod
    def _dcp(group: dist.ProcessGroup | None) -> dict[str, Any]:
        return {"process_group": group, "no_dist": not collectives.is_distributed(group)}


def _in_daemon_thread(fn, *args) -> Future:
    """Run fn(*args) on a daemon thread: a process that dies with a save pending exits instead
    of hanging in the save's collectives (the commit protocol keeps the disk consistent)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(err)

    threading.Thread(target=run, name="checkpoint-save", daemon=True).start()
    return future


def _check_tensors(tensors: dict[str, Any]) -> None:
    for name, value in tensors.items():
        if not isinstance(value, (torch.Tensor, ShardView)):
            raise ValueError(
                f"{name!r} is a {type(value).__name__}, not a tensor; pass it in global_state"
            )


def _checked_json(obj: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(obj, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serialisable: {err}") from err
