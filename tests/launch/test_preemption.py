"""SIGTERM to `perennial train` (what Slurm sends on preemption or at the time limit): the
workers save at the next step boundary, the launcher exits 143, and the same command run again
resumes and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from checkpointing import resolve_checkpoint
from checkpointing.inspect import verify
from tests.trainer.runs import REPO, metrics, perennial, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights

pytestmark = pytest.mark.slow

MAX_STEPS = 8
JOB = ["checkpoint.interval=2", "checkpoint.persist_interval=4", f"train.max_steps={MAX_STEPS}"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def start_train(run_dir: Path, data_cache: Path, log: Path, **env: str) -> subprocess.Popen:
    """`perennial train --nproc 2` in the background, output to `log`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1", **env}
    argv = [sys.executable, "-m", "launch.cli", "train", *tiny_job(run_dir, data_cache, *JOB),
            "--nproc", "2"]
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in metrics(run_dir)):
            return
        assert proc.poll() is None, f"training ended ({proc.returncode}) before step {step}"
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached within {timeout_s} s")


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    ref_dir = tmp_path_factory.mktemp("reference")
    perennial("train", *tiny_job(ref_dir, data_cache, *JOB), "--nproc", "2")
    return ref_dir


def launcher_only(proc: subprocess.Popen) -> None:
    """`kill -TERM <launcher>` by hand."""
    proc.send_signal(signal.SIGTERM)


def whole_job(proc: subprocess.Popen) -> None:
    """What Slurm does on preemption: SIGTERM to every process of the job step at once, the
    snapshot keeper included (it may be gone before the workers save)."""
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any("snapshot.keeper" in " ".join(p.cmdline()) for p in processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("send_sigterm", [launcher_only, whole_job])
def test_sigterm_saves_exits_143_and_resumes_bitwise(tmp_path, data_cache, reference,
                                                     send_sigterm):
    ref_dir = reference
    run_dir, log = tmp_path / "run", tmp_path / "preempted.log"
    proc = start_train(run_dir, data_cache, log, PERENNIAL_FAULT_STEP_DELAY_S="0.5")
    try:
        wait_for_step(run_dir, 3, proc)
        send_sigterm(proc)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == 143, output
    reached = metrics(run_dir)[-1]["step"]
    assert 3 <= reached < MAX_STEPS, output
    assert f"SIGTERM: saving step {reached}" in output
    assert committed_steps(run_dir)[-1] == reached, output
    assert verify(resolve_checkpoint(run_dir)).problems == []  # what `perennial ckpt verify` runs

    resumed = perennial("train", *tiny_job(run_dir, data_cache, *JOB), "--nproc", "2")
    assert f"step-{reached:08d}" in resumed.stderr + resumed.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(ref_dir, tmp_path))
