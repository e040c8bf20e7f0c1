"""Per-rank health: a hang watchdog and, on GPUs, NVML sampling with fatal-error detection.

The Trainer brackets every step (its eval and checkpoint writes included) with
`step_started(step)` / `step_finished()`. A background thread then

- ends the rank with HANG_EXIT_CODE when a step runs longer than `train.hang_timeout_s`
  (0 = off), after dumping every thread's Python stack (faulthandler) to stderr;
- on GPUs, samples utilisation, memory, temperature and ECC counters every
  SAMPLE_INTERVAL_S into `<run.dir>/health/rank-NNNNN.jsonl`, and ends the rank with
  DEVICE_FAULT_EXIT_CODE when the device reports an uncorrectable ECC error or a fatal XID.

A rank that exits makes torchrun stop the group and, within `--max-restarts`, start it again;
the new workers resume from the newest checkpoint: snapshot-and-restart instead of a job that
hangs until its time limit. Functions in `before_exit` run first (e.g. to persist a snapshot
the in-memory layer already holds); they must not wait on other ranks, which may be stuck.

On CPU, or where NVML is absent, the monitor says so once (rank 0) and samples nothing.

Fault injection, for tests only (environment variables read by `step_started`):
  PERENNIAL_FAULT_SLEEP_AT_STEP=S   rank PERENNIAL_FAULT_RANK (default 0) sleeps
                                    PERENNIAL_FAULT_SLEEP_S (default 3600) seconds when step S
                                    starts, on torchrun's first attempt only;
  PERENNIAL_FAULT_STEP_DELAY_S=D    every step takes D seconds longer (a slow job to preempt).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.gpu_probe import GpuProbe

HANG_EXIT_CODE = 86
DEVICE_FAULT_EXIT_CODE = 87
SAMPLE_INTERVAL_S = 30.0


def validate_hang_timeout(hang_timeout_s: float) -> None:
    if hang_timeout_s < 0:
        raise ValueError(f"train.hang_timeout_s must be >= 0 (0 = off), got {hang_timeout_s}")


class HealthMonitor:
    def __init__(
        self,
        hang_timeout_s: float,
        rank: int,
        device: torch.device,
        log_dir: str | os.PathLike | None = None,
        sample_interval_s: float = SAMPLE_INTERVAL_S,
    ):
        validate_hang_timeout(hang_timeout_s)
        self.hang_timeout_s = hang_timeout_s
        self.rank = rank
        self.sample_interval_s = sample_interval_s
        self.before_exit: list[Callable[[], None]] = []
        self.gpu, why_not = GpuProbe.open(device)
        if self.gpu is None and rank == 0:
            print(f"health: GPU sampling off: {why_not}", file=sys.stderr, flush=True)
        self.log_path = Path(log_dir) / f"rank-{rank:05d}.jsonl" if log_dir and self.gpu else None
        self._step = 0
        self._step_began: float | None = None
        self._stop = threading.Event()
        self._thread = None
        if self.hang_timeout_s > 0 or self.gpu is not None:
            self._thread = threading.Thread(target=self._watch, name="health", daemon=True)
            self._thread.start()

    @classmethod
    def build(cls, cfg, dist_info) -> HealthMonitor:
        return cls(
            cfg.train.hang_timeout_s,
            dist_info.rank,
            dist_info.device,
            log_dir=Path(cfg.run.dir) / "health",
        )

    # -- called by the Trainer ----------------------------------------------------------------
    def step_started(self, step: int) -> None:
        self._step = step
        self._step_began = time.monotonic()
        _maybe_inject_fault(step, self.rank)

    def step_finished(self) -> None:
        self._step_began = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.gpu is not None:
            self.gpu.close()

    # -- the watchdog thread ------------------------------------------------------------------
    def _watch(self) -> None:
        poll_s = min(1.0, self.hang_timeout_s / 4) if self.hang_timeout_s > 0 else 1.0
        next_sample = time.monotonic()
        while not self._stop.wait(poll_s):
            self._check_hang()
            if self.gpu is None:
                continue
            fault = self.gpu.fatal_error()
            if fault:
                self.fail(fault, DEVICE_FAULT_EXIT_CODE)
            if time.monotonic() >= next_sample:
                self._write_sample()
                next_sample = time.monotonic() + self.sample_interval_s

    def _check_hang(self) -> None:
        began = self._step_began
        if self.hang_timeout_s <= 0 or began is None:
            return
        elapsed = time.monotonic() - began
        if elapsed > self.hang_timeout_s:
            self.fail(
                f"step {self._step} has run {elapsed:.1f} s, longer than "
                f"train.hang_timeout_s={self.hang_timeout_s:g}",
                HANG_EXIT_CODE,
            )

    def _write_sample(self) -> None:
        record = {"time": time.time(), "step": self._step, **self.gpu.sample()}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(json.dumps(record) + "\n")

    def fail(self, reason: str, exit_code: int) -> None:
        """Dump the stacks, run the before-exit hooks, and end this process at once: the main
        thread may be stuck in a collective that would never return."""
        print(
            f"error: rank {self.rank}: {reason}; dumping stacks and exiting with code "
            f"{exit_code} so the launcher restarts the group from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for hook in self.before_exit:
            try:
                hook()
            except Exception as err:  # noqa: BLE001 - exiting matters more than the hook
                print(f"health: before-exit hook failed: {err}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(exit_code)


def _maybe_inject_fault(step: int, rank: int) -> None:
    env = os.environ
    delay = float(env.get("PERENNIAL_FAULT_STEP_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    sleep_at = env.get("PERENNIAL_FAULT_SLEEP_AT_STEP")
    if not sleep_at or int(sleep_at) != step or rank != int(env.get("PERENNIAL_FAULT_RANK", "0")):
        return
    if int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        time.sleep(float(env.get("PERENNIAL_FAULT_SLEEP_S", "3600")))
