"""Run `perennial train` as users do (a subprocess; torchrun for --nproc > 1) on a tiny job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_job(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "data.seq_len=32", "train.global_batch_size=12", "train.micro_batch_size=2",
        "train.log_interval=1", "eval.interval=0", "schedule.warmup_steps=2",
        "log.progress=false", "optim.lr=3e-3",
        *overrides,
    ]


def perennial(*args: str, check: bool = True, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"perennial {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(run_dir: Path, cache_dir: Path, nproc: int = 1, *overrides: str) -> list[dict]:
    perennial("train", *tiny_job(run_dir, cache_dir, *overrides), "--nproc", str(nproc))
    return metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def finish_copied_run(saved: Path, run_dir: Path, cache_dir: Path, nproc: int, max_steps: int,
                      *overrides: str) -> list[dict]:
    """Copy the stopped run `saved` to `run_dir` and train it to `max_steps` (on another layout,
    when `overrides` say so); its records, every step logged once."""
    import shutil

    shutil.copytree(saved, run_dir)
    records = train(run_dir, cache_dir, nproc, *overrides, f"train.max_steps={max_steps}")
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    return records


def assert_same_losses(records: list[dict], reference: list[dict], exact: bool) -> None:
    """Bitwise equal losses (`exact`: the same layout), else within 1e-3 relative."""
    import torch

    if exact:
        assert losses(records) == losses(reference)
    else:
        torch.testing.assert_close(losses(records), losses(reference), rtol=1e-3, atol=0)
