"""Out of the box (no checkpoint settings), `perennial train` saves to disk without blocking
long before the first persist_interval step, so a kill -9 of everything loses little."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import psutil

from checkpointing import find_loadable
from tests.trainer.runs import REPO, metrics, perennial, tiny_job

STEPS = 400  # far more than the run lives: it is killed at KILL_AT
KILL_AT = 40


def kill_tree(proc: subprocess.Popen) -> None:
    tree = psutil.Process(proc.pid).children(recursive=True)
    for process in [psutil.Process(proc.pid), *tree]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait(timeout=30)


def test_default_run_killed_mid_way_resumes_from_a_recent_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    job = tiny_job(run_dir, data_cache, f"train.max_steps={STEPS}", f"schedule.total_steps={STEPS}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *job, "--nproc", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            path = run_dir / "metrics.jsonl"
            if path.exists() and re.search(rf'"step": {KILL_AT}\b', path.read_text()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        kill_tree(proc)
    killed_at = max(r["step"] for r in metrics(run_dir))
    committed = find_loadable(run_dir)
    assert committed and all(c.problem is None for c in committed)
    newest = committed[0].step
    # The first cadence save comes at step 10; persist_interval (100) alone would leave none.
    assert 10 <= newest <= killed_at
    resumed = perennial("train", *job, f"train.max_steps={killed_at + 2}", "--nproc", "2")
    assert f"resumed from {committed[0].path} (step {newest})" in resumed.stderr
