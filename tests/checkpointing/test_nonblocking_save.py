"""CheckpointManager.save(blocking=False): the step pays only the copy into reused host
buffers; a crash in any phase of the background write leaves a loadable checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checkpointing import CheckpointManager, find_loadable
from tests.checkpointing.save_crash_child import state
from tests.checkpointing.test_parallel_reads import mlp_state
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def save_then_mutate(root: str) -> bool:
    tensors = mlp_state("fsdp")
    saved = {k: full(v).clone() for k, v in tensors.items()}
    manager = CheckpointManager(root, keep=2)
    manager.save(1, tensors, {"step": 1}, blocking=False)
    with torch.no_grad():  # training goes on while the background thread writes
        for value in tensors.values():
            value.add_(1.0)
    dist.all_reduce(torch.ones(3))  # the training group stays usable meanwhile
    buffers = [b.data_ptr() for b in manager._host_buffers._buffers.values()]
    manager.save(2, tensors, {"step": 2}, blocking=False)  # waits for step 1's commit
    reused = buffers == [b.data_ptr() for b in manager._host_buffers._buffers.values()]
    assert manager.wait() == Path(root) / "step-00000002"
    loaded = mlp_state("fsdp")
    result = manager.load(Path(root) / "step-00000001", loaded)
    first_ok = result.global_state == {"step": 1} and all(
        torch.equal(full(loaded[k]), saved[k]) for k in saved
    )
    manager.close()
    return first_ok and reused


def test_nonblocking_save_commits_the_copy_taken_at_the_call(tmp_path):
    assert run_distributed(save_then_mutate, 2, args=(str(tmp_path),)) == [True, True]


def test_background_error_reaches_the_next_call(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    (tmp_path / "ckpt").write_text("not a directory")
    manager.save(1, {"t": torch.ones(3)}, blocking=False)
    with pytest.raises(OSError):
        manager.wait()
    assert manager.wait() is None  # raised once


@pytest.mark.parametrize(
    "phase, survivor",
    [("copy", 1), ("write", 1), ("fsync", 1), ("rename", 1), ("latest", 2), ("none", 2)],
)
def test_killed_nonblocking_save_leaves_a_loadable_checkpoint(tmp_path, phase, survivor):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-m", "tests.checkpointing.save_crash_child", str(tmp_path), phase],
        env=env,
        cwd=ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert child.returncode == (0 if phase == "none" else -9), child.stderr
    assert [c.problem for c in find_loadable(tmp_path)] == [None] * len(find_loadable(tmp_path))
    loaded = {k: torch.zeros_like(v) for k, v in state(0).items()}
    result = CheckpointManager(tmp_path).load_latest(loaded)
    assert result.step == survivor
    assert all(torch.equal(loaded[k], v) for k, v in state(survivor).items())
