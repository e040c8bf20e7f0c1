"""Fixtures shared by the checkpointing tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.runs import REPO

DEEPSPEED_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                 "DS_ACCELERATOR": "cpu"}


def run_python(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=DEEPSPEED_ENV,
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "Warning" not in line]
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n".join(errors)[:4000]


@pytest.fixture(scope="session")
def deepspeed_sources(tmp_path_factory) -> Path:
    """Real DeepSpeed ZeRO-1/2/3 checkpoints (2 gloo ranks) with their ds_to_universal
    folders, and live-engine saves: tests/checkpointing/deepspeed_engines.py, one launch."""
    root = tmp_path_factory.mktemp("deepspeed")
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.checkpointing.deepspeed_engines", str(root))
    return root
