"""Step metrics: one line per logged step on rank 0, `metrics.jsonl`, optional W&B.

Each line says where the run is (`step 120/300`, elapsed, ETA) and its throughput smoothed over
the last few logged intervals (the first interval after a start, which pays for warm-up, leaves
the window as soon as another is there); `metrics.jsonl` keeps the raw interval value too.
On GPUs it adds MFU and memory (torch.cuda peak allocation, NVML device memory); on CPU those
fields are absent rather than made up. Every device reports `peak_rss_gib`, the largest peak
resident set size (host memory high-water mark) of any rank so far.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.wandb_log import flatten, last_step_held, start_wandb

# Dense bf16 peak FLOP/s by device-name fragment (vendor datasheets), for MFU.
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in _PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


class NvmlMemory:
    """Device memory in use as NVML sees it (all processes, caching allocator included)."""

    def __init__(self, device_index: int):
        self.handle = None
        try:
            import pynvml  # provided by nvidia-ml-py

            pynvml.nvmlInit()
            self._pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no driver / no GPU: NVML is simply absent
            self.handle = None

    def used_gib(self) -> float | None:
        if self.handle is None:
            return None
        return self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30


MAX_PENDING_LINES = 100_000


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites stay unconditional."""

    def __init__(self, run_dir: str, enabled: bool, wandb_cfg=None, config_dict=None,
                 max_steps: int | None = None, run_name: str = ""):
        self.enabled = enabled
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.pending: list[str] = []
        self.retries: list = []
        self.write_failing = False
        self.wandb_run = None
        self.wandb_holds_through = 0
        if enabled and wandb_cfg is not None and wandb_cfg.wandb:
            name = run_name or Path(run_dir).name
            self.wandb_run = start_wandb(run_dir, name, wandb_cfg.wandb_project, config_dict)

    def truncate_after(self, step: int) -> None:
        """After a resume from `step`, drop lines the crashed run logged past it, so the file
        holds one line per step of the continued run; W&B gets the steps up to `step` it lacks
        (trainer/wandb_log.py). Cutting off the end needs no free space."""
        if not self.enabled:
            return
        text = self.path.read_text() if self.path.exists() else ""
        kept_lines = [line for line in text.splitlines()
                      if line.strip() and json.loads(line).get("step", 0) <= step]
        kept = "".join(line + "\n" for line in kept_lines)
        try:
            if text.startswith(kept):
                if self.path.exists():
                    os.truncate(self.path, len(kept.encode()))
            else:
                self.path.write_text(kept)
        except OSError as err:
            print(f"warning: cannot rewrite {self.path} ({err.strerror or err})",
                  file=sys.stderr, flush=True)
        if self.wandb_run is not None:
            held = last_step_held(self.wandb_run, self.run_dir)
            for record in map(json.loads, kept_lines):
                if record["step"] > held:
                    self.wandb_run.log(flatten(record), step=record["step"])
            self.wandb_holds_through = max(held, step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(json.dumps(record) + "\n")
        if self.wandb_run is not None and record["step"] > self.wandb_holds_through:
            self.wandb_run.log(flatten(record), step=record["step"])
        print(format_line(record, self.max_steps), file=sys.stdout, flush=True)

    def _append(self, line: str) -> None:
        """A full disk must not stop training: a failed write is a warning and the lines are
        written with the next one that succeeds (at most MAX_PENDING_LINES kept)."""
        self.pending.append(line)
        del self.pending[:-MAX_PENDING_LINES]
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write("".join(self.pending))
        except OSError as err:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no torn line: they are all written again later
            if not self.write_failing:
                print(f"warning: cannot write {self.path} ({err.strerror or err}); training "
                      "goes on, the lines are written when the disk has room",
                      file=sys.stderr, flush=True)
            self.write_failing = True
            return
        self.pending.clear()
        self.write_failing = False
        self._retry_writes()

    def retry_later(self, write) -> None:
        """Call `write()` again after the next metrics line that reaches the disk, until it
        succeeds (config.yaml when the disk was full at the start)."""
        self.retries.append(write)

    def _retry_writes(self) -> None:
        waiting, self.retries = self.retries, []
        for write in waiting:
            try:
                write()
            except OSError:
                self.retries.append(write)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_line(record: dict, max_steps: int | None = None) -> str:
    total = f"/{max_steps}" if max_steps else ""
    parts = [f"step {record['step']:>6}{total}"]
    record = {**record, "tokens_per_s": record.get("tokens_per_s_smooth",
                                                   record.get("tokens_per_s"))}
    formats = {
        "loss": "loss {:.4f}",
        "lr": "lr {:.2e}",
        "grad_norm": "gnorm {:.3f}",
        "tokens_per_s": "tok/s {:,.0f}",
        "mfu": "mfu {:.1%}",
        "memory_gib": "mem {:.1f}GiB",
        "peak_rss_gib": "rss {:.2f}GiB",
        "moe_aux_loss": "aux {:.4f}",
        "moe_z_loss": "z {:.2e}",
        "moe_max_expert_share": "max-expert {:.1%}",
    }
    for key, fmt in formats.items():
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    for name, value in (record.get("eval_loss") or {}).items():
        parts.append(f"eval[{name}] {value:.4f}")
    for key, label in (("elapsed_s", "elapsed"), ("eta_s", "eta")):
        if record.get(key) is not None:
            parts.append(f"{label} {duration(record[key])}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """1h02m, 3m07s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_peak_rss_gib(device: torch.device) -> float:
    """The largest peak RSS of any rank (a collective when a process group is up): one
    all-reduce of one number per logged step."""
    peak = torch.tensor([float(peak_rss_bytes())], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


class Throughput:
    """Tokens/s (per interval between logged steps, and smoothed), MFU, elapsed time and ETA."""

    WINDOW = 5
    """Logged intervals the smoothed tokens/s and the ETA average over."""

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device,
                 max_steps: int = 0):
        self.max_steps = max_steps
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak = (
            peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        )
        self.nvml = NvmlMemory(device.index or 0) if device.type == "cuda" else None
        self.reset()

    def reset(self) -> None:
        """At the start of a run (and after a resume): the clock and the window restart."""
        self.started = self.start = time.perf_counter()
        self.tokens = self.steps = 0
        self.window: deque[tuple[int, int, float]] = deque(maxlen=self.WINDOW)
        self.warming_up = True

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def measure(self, step: int | None = None) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        if self.warming_up and self.window:  # the first interval paid for warm-up: drop it
            self.window.clear()
            self.warming_up = False
        self.window.append((self.tokens, self.steps, elapsed))
        tokens, steps, seconds = (sum(column) for column in zip(*self.window))
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_smooth": tokens / seconds,
               "elapsed_s": now - self.started}
        if step is not None and self.max_steps and steps:
            out["eta_s"] = max(self.max_steps - step, 0) * seconds / steps
        if self.peak is not None:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        if self.device.type == "cuda":
            out["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["nvml_memory_gib"] = self.nvml.used_gib()
        out["peak_rss_gib"] = max_peak_rss_gib(self.device)
        self.start, self.tokens, self.steps = now, 0, 0
        return out
