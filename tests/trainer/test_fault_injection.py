"""Fault injection with real processes and real signals: `perennial train --nproc 2` with memory
snapshots, SIGKILLed in various places; every run must end bitwise equal to an uninterrupted one
and lose at most `checkpoint.interval` steps per failure."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launch.keepers import shm_root_for
from tests.seeds import replayable_seed
from tests.trainer.runs import REPO, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights

pytestmark = pytest.mark.slow
INTERVAL = 2
STEPS = 10
JOB = [f"schedule.total_steps={STEPS}", f"train.max_steps={STEPS}",
       "checkpoint.persist_interval=4", f"checkpoint.interval={INTERVAL}"]


class Run:
    """A `perennial train` launcher whose output is read live, so faults can follow progress."""

    started: list[Run] = []

    def __init__(self, run_dir: Path, cache: Path, *extra: str, env: dict | None = None):
        self.run_dir = run_dir
        args = [*tiny_job(run_dir, cache, *JOB), "--nproc", "2", "--max-restarts", "4"]
        environ = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
                   "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", *args, *extra], cwd=REPO, env=environ,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        Run.started.append(self)

    def kill_all(self) -> None:
        """A failed test leaves nothing running: launcher, torchrun, workers, keepers."""
        if self.proc.poll() is not None:  # ended and reaped: its pid may be another's now
            return
        try:
            tree = [*psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in [*tree, psutil.Process(self.proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(shm_root_for(self.run_dir), ignore_errors=True)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log)
            if match:
                return match
            assert self.proc.poll() is None, f"run ended early:\n{self.log}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.log}")

    def last_step(self) -> int:
        steps = re.findall(r"^step\s+(\d+)", self.log, re.M)
        return int(steps[-1]) if steps else 0

    def wait_for_step(self, step: int) -> int:
        self.wait_for(rf"(?m)^step\s+{step}\b")
        return self.last_step()

    def processes(self, marker: str) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            launcher = any(t in cmd for t in ("torch.distributed.run", "launch.torchrun"))
            if marker in cmd and not launcher:
                found.append(child)
        return found

    def workers(self) -> list[psutil.Process]:
        return sorted(self.processes("-m trainer"), key=lambda p: p.pid)

    def kill_worker(self, index: int) -> int:
        """SIGKILL one worker; returns the last step logged before it."""
        step = self.last_step()
        self.workers()[index].send_signal(signal.SIGKILL)
        return step

    def finish(self, timeout: float = 240) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.log
        assert not (shm_root_for(self.run_dir)).exists(), "shared memory left behind"
        return self.log


@pytest.fixture(autouse=True)
def no_leftover_runs():
    yield
    while Run.started:
        Run.started.pop().kill_all()


def resumes(log: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2)))
            for m in re.finditer(r"resumed from (\S+) \(step (\d+)\)", log)]


def assert_recovered(log: str, killed_after: list[int]) -> None:
    """One memory resume per kill, each losing at most INTERVAL steps (plus the step running)."""
    found = resumes(log)
    assert len(found) == len(killed_after), log
    for (source, step), last in zip(found, killed_after):
        assert source.startswith("memory:"), log
        assert step >= last - INTERVAL, f"resumed at {step} after reaching {last}:\n{log}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("fault-reference")
    run = Run(run_dir, data_cache)
    run.finish()
    return final_weights(run_dir, tmp_path_factory.mktemp("ref-export"))


def test_sigkill_random_ranks_repeatedly(tmp_path, data_cache, reference):
    rng = random.Random(replayable_seed("PERENNIAL_FAULT_SEED"))
    # From INTERVAL + 1 on, a complete snapshot exists (before it, a restart starts afresh).
    # Each rank SIGKILLs itself right after the snapshot of its step starts: no race with this
    # test's reaction time, and a kill that falls on a snapshot step tears that snapshot.
    steps = sorted(rng.sample(range(INTERVAL + 1, STEPS), 3))
    faults = ";".join(f"step@{s}#{rng.randrange(2)}:kill:{tmp_path / f'killed-{s}'}"
                      for s in steps)
    log = Run(tmp_path / "run", data_cache, env={"PERENNIAL_FAULT_PAUSE": faults}).finish()
    assert len(re.findall(r"fault-injection: killed itself", log)) == 3, log
    assert_recovered(log, steps)
    assert_bitwise_equal(final_weights(tmp_path / "run", tmp_path), reference)


def test_sigkill_during_snapshot_copy(tmp_path, data_cache, reference):
    pause = f"copy@{2 * INTERVAL}:30:{tmp_path / 'paused'}"  # a complete snapshot exists
    run = Run(tmp_path / "run", data_cache, env={"PERENNIAL_FAULT_PAUSE": pause})
    pid = int(run.wait_for(r"paused in copy \(rank \d step (\d+)\) pid (\d+)").group(2))
    step = run.last_step()
    os.kill(pid, signal.SIGKILL)
    log = run.finish()
    assert_recovered(log, [step])
    torn = int(re.search(r"paused in copy \(rank \d step (\d+)\)", log).group(1))
    assert resumes(log)[0][1] < torn  # the torn snapshot was not used
    assert_bitwise_equal(final_weights(tmp_path / "run", tmp_path), reference)


def test_sigkill_keeper_during_persist_then_a_rank(tmp_path, data_cache, reference):
    # Both kill themselves at a fixed point (no race with this test's reaction time): the keeper
    # while persisting step 4, then a rank right after starting the snapshot of step 8.
    faults = f"persist:kill:{tmp_path / 'keeper-killed'};step@8:kill:{tmp_path / 'rank-killed'}"
    run = Run(tmp_path / "run", data_cache, env={"PERENNIAL_FAULT_PAUSE": faults})
    log = run.finish()
    assert "keeper of node 0 exited (-9); restarting it" in log
    assert "resuming the interrupted persist of step 4" in log
    assert_recovered(log, [8])  # from the slots the restarted keeper adopted and filled
    assert_bitwise_equal(final_weights(tmp_path / "run", tmp_path), reference)


def test_node_loss_with_peer_replica(tmp_path, data_cache, reference):
    run = Run(tmp_path / "run", data_cache, "checkpoint.replicas=1", "--simulated-nodes", "2")
    run.wait_for_step(5)
    (keeper,) = [p for p in run.processes("snapshot.keeper") if "--node-index 1" in
                 " ".join(p.cmdline())]
    # The node goes down as a whole: its worker (rank 1) and its keeper, with its memory.
    killed_after = [run.kill_worker(1)]
    keeper.send_signal(signal.SIGKILL)
    keeper.wait()
    shutil.rmtree(shm_root_for(tmp_path / "run") / "node1")
    log = run.finish()
    assert "of this node from the peer replica" in log
    assert_recovered(log, killed_after)
    assert_bitwise_equal(final_weights(tmp_path / "run", tmp_path), reference)


def test_disk_full_during_persist(tmp_path, data_cache, reference):
    env = {"PERENNIAL_KEEPER_MAX_FILE_BYTES": "4096",
           "PERENNIAL_FAULT_PAUSE": f"step@6:kill:{tmp_path / 'rank-killed'}"}
    log = Run(tmp_path / "run", data_cache, env=env).finish()
    assert "warning: persist of step 4 failed" in log and "File too large" in log
    assert_recovered(log, [6])  # memory is newer than anything on disk
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004").exists()
    assert_bitwise_equal(final_weights(tmp_path / "run", tmp_path), reference)
