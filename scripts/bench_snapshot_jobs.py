"""The training-job half of scripts/bench_snapshot.py: `perennial train` subprocesses measuring
the throughput cost of memory snapshots and the recovery time after a SIGKILLed worker.

Throughput: snapshots off, `checkpoint.interval=10` and `=1`, runs alternating, median tokens/s
over the logged intervals after warm-up. Recovery: `--nproc 2 --max-restarts 1`, one worker
SIGKILLed after step KILL_AT; memory tier (snapshots every 2 steps) vs disk tier (snapshots off,
a committed checkpoint every 5 steps). Times are from the SIGKILL, stamped as lines arrive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from scripts.report import REPO

LOG_EVERY, WARMUP_STEPS = 10, 10
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2"]
SMALL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=8"]
TINY_LABEL = "tiny Llama (dim 64, 2 layers), 4 x 32 tokens"
THROUGHPUT_JOBS = {  # quick -> {job label: (overrides, steps per run, alternating rounds)}
    False: {TINY_LABEL: (TINY, 100, 3),
            "small Llama (dim 128, 4 layers), 8 x 64 tokens": (SMALL, 50, 2)},
    True: {TINY_LABEL: (TINY, 30, 1)},
}
TOKENS_PER_STEP = {TINY_LABEL: 4 * 32, "small Llama (dim 128, 4 layers), 8 x 64 tokens": 8 * 64}
THROUGHPUT_VARIANTS = {  # label -> overrides
    "snapshots off": ["checkpoint.interval=0"],
    "snapshot every 10 steps": ["checkpoint.interval=10"],
    "snapshot every step": ["checkpoint.interval=1"],
}
RECOVERY_JOB = {  # quick -> model and batch overrides (full: the default ~3M-parameter Llama)
    False: ["data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2"],
    True: TINY,
}
KILL_AT, RECOVERY_STEPS = 14, 20
RECOVERY_VARIANTS = {
    "memory tier (snapshot every 2 steps)": ["checkpoint.interval=2",
                                             f"checkpoint.persist_interval={RECOVERY_STEPS}"],
    "disk tier (checkpoint every 5 steps)": ["checkpoint.interval=0",
                                             "checkpoint.persist_interval=5"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1"}


def _job_args(run_dir: Path, cache: Path, steps: int, *overrides: str) -> list[str]:
    return [f"run.dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
            "eval.interval=0", "schedule.warmup_steps=5", "log.progress=false",
            f"checkpoint.persist_interval={steps}", *overrides]


def train_rates(workdir: Path, steps: int, overrides: list[str]) -> list[float]:
    run_dir = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    args = _job_args(run_dir, workdir / "cache", steps, f"train.log_interval={LOG_EVERY}",
                     *overrides)
    subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=REPO, env=_env(),
                   check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records
            if r["step"] > WARMUP_STEPS and r["step"] % LOG_EVERY == 0]


def measure_throughput(workdir: Path, quick: bool) -> dict[str, dict[str, list[float]]]:
    """{job: {variant: tokens/s samples}}; variants alternate round by round, so a change in
    machine load hits all of them."""
    results = {}
    for job, (base, steps, rounds) in THROUGHPUT_JOBS[quick].items():
        train_rates(workdir, LOG_EVERY, base)  # builds the corpus cache outside the measurement
        results[job] = {label: [] for label in THROUGHPUT_VARIANTS}
        for _ in range(rounds):
            for label, overrides in THROUGHPUT_VARIANTS.items():
                results[job][label] += train_rates(workdir, steps, [*base, *overrides])
        for label, rates in results[job].items():
            print(f"throughput {job}, {label}: {statistics.median(rates):,.0f} tok/s", flush=True)
    return results


class TimedRun:
    """`perennial train --nproc 2 --max-restarts 1` whose output lines carry arrival times."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", *args, "--nproc", "2",
             "--max-restarts", "1"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.match(rf"step\s+{step}\b", line) for _, line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no step {step}:\n{self.log()}")
            time.sleep(0.01)

    def kill_worker(self) -> float:
        workers = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                   if "-m trainer" in " ".join(p.cmdline())
                   and "-m launch.torchrun" not in " ".join(p.cmdline())]
        killed_at = time.monotonic()
        min(workers, key=lambda p: p.pid).send_signal(signal.SIGKILL)
        return killed_at

    def finish(self) -> None:
        self.proc.wait(timeout=300)
        self.reader.join(timeout=10)
        if self.proc.returncode != 0:
            raise RuntimeError(f"run failed:\n{self.log()}")


def _after(lines: list[tuple[float, str]], since: float, pattern: str):
    for stamp, line in lines:
        if stamp >= since and (match := re.search(pattern, line)):
            return stamp, match
    raise RuntimeError(f"no {pattern!r} after the kill")


def recover_once(workdir: Path, overrides: list[str]) -> dict[str, float]:
    run_dir = workdir / f"recovery-{len(list(workdir.glob('recovery-*')))}"
    run = TimedRun(_job_args(run_dir, workdir / "cache", RECOVERY_STEPS, "train.log_interval=1",
                             *overrides))
    run.wait_for_step(KILL_AT)
    killed_at = run.kill_worker()
    run.finish()
    reached = max(int(m) for stamp, line in run.lines if stamp < killed_at
                  for m in re.findall(r"^step\s+(\d+)", line))
    resumed_at, match = _after(run.lines, killed_at, r"resumed from (\S+) \(step (\d+)\)")
    next_at, _ = _after(run.lines, resumed_at, r"^step\s+\d+")
    resumed_step = int(match.group(2))
    regained_at = resumed_at if resumed_step >= reached else min(
        stamp for stamp, line in run.lines if stamp >= resumed_at
        and (found := re.match(r"step\s+(\d+)", line)) and int(found.group(1)) >= reached)
    return {"resumed": resumed_at - killed_at, "next step": next_at - killed_at,
            "regained": regained_at - killed_at, "steps lost": reached - resumed_step,
            "source": match.group(1).split(":")[0] if ":" in match.group(1) else "disk"}


def measure_recovery(workdir: Path, quick: bool) -> dict[str, list[dict]]:
    repeats = 1 if quick else 2
    results: dict[str, list[dict]] = {label: [] for label in RECOVERY_VARIANTS}
    for _ in range(repeats):
        for label, overrides in RECOVERY_VARIANTS.items():
            results[label].append(recover_once(workdir, [*RECOVERY_JOB[quick], *overrides]))
            print(f"recovery {label}: {results[label][-1]}", flush=True)
    return results
