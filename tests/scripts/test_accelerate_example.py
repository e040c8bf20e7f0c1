"""scripts/accelerate_example.py: an Accelerate loop whose checkpoints `perennial train` loads,
and which resumes `perennial train` checkpoints.

On CPU Accelerate turns an FSDP plugin into DDP, so only the DDP path (2 gloo processes) is
tested here; the FSDP2 path needs GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.trainer.runs import REPO, perennial, tiny_job
from trainer.distributed import free_port

MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]
SCRIPT = str(REPO / "scripts" / "accelerate_example.py")


def run_script(*args: str, nproc: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc > 1:  # see the script's docstring for why not `--cpu`
        env["ACCELERATE_USE_CPU"] = "1"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", str(nproc), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]  # fmt: skip
    else:
        launch = [sys.executable]
    proc = subprocess.run(
        [*launch, SCRIPT, *args, *MODEL], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_checkpoints_move_between_accelerate_and_perennial_train(tmp_path):
    acc = tmp_path / "acc"
    out = run_script("--ckpt-dir", str(acc), "--steps", "4", "--save-every", "2", nproc=2)
    assert "saved step 4" in out
    state = json.loads((acc / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and sorted(p.name for p in acc.glob("step-*")) == [
        "step-00000002", "step-00000004"
    ]  # fmt: skip

    run = tmp_path / "run"
    job = tiny_job(run, tmp_path / "cache", f"init.from={acc}", "train.max_steps=2",
                   "init.load_optimizer=true", "schedule.warmup_steps=1")  # fmt: skip
    proc = perennial("train", *job)
    assert f"warm start: weights + optimizer from {acc / 'step-00000004'}" in proc.stderr

    out = run_script("--ckpt-dir", str(tmp_path / "acc2"), "--init-from", str(run),
                     "--steps", "3", "--save-every", "10", nproc=1)  # fmt: skip
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} (step 2)" in out
    assert "step 3 loss" in out and "step 1 loss" not in out
    assert (tmp_path / "acc2" / "step-00000003").is_dir()
