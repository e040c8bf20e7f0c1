"""A worker's failure reaches the user of `perennial train --nproc 2` as one line naming the rank
and the cause (torchrun's error files, launch/torchrun.py), every time, without torchrun's
ChildFailedError report."""

from __future__ import annotations

import pytest

from tests.trainer.runs import perennial, tiny_job


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_clean_line(proc, *fragments: str) -> str:
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr
    for noise in ("ChildFailedError", "Traceback", "see the worker output"):
        assert noise not in proc.stderr, proc.stderr
    return lines[0]


def worker_only_error_job(tmp_path) -> list[str]:
    """A job the launcher's checks pass and every worker refuses: only the warm start finds
    that a torch DCP checkpoint holds no optimizer state to load."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "dcp"))
    return tiny_job(tmp_path / "run", tmp_path / "cache", f"init.from={tmp_path / 'dcp'}",
                    "init.load_optimizer=true")


def test_a_worker_user_error_is_one_line_every_time(tmp_path):
    """Every try, not most: the error used to be lost in 2 of 3 runs."""
    job = worker_only_error_job(tmp_path)
    for _ in range(3):
        proc = perennial("train", *job, "--nproc", "2", check=False)
        line = assert_one_clean_line(proc, "failed: init.from=", "is a torch DCP checkpoint")
        assert line.startswith("error: rank "), line
        assert proc.returncode == 2


@pytest.mark.slow
def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    marker = tmp_path / "fault-marker"
    job = tiny_job(tmp_path / "run", tmp_path / "cache", "train.max_steps=6",
                   "checkpoint.interval=1")
    proc = perennial("train", *job, "--nproc", "2", check=False,
                     env={"PERENNIAL_FAULT_PAUSE": f"step@2#1:kill:{marker}"})
    assert_one_clean_line(proc, "error: rank 1 failed: killed by SIGKILL")


def test_verbose_keeps_torchruns_report(tmp_path):
    job = worker_only_error_job(tmp_path)
    proc = perennial("train", *job, "--nproc", "2", "--verbose", check=False)
    assert "ChildFailedError" in proc.stderr or "Root Cause" in proc.stderr, proc.stderr
    assert len(error_lines(proc.stderr)) == 1
