"""Step metrics: one line per logged step on rank 0, `metrics.jsonl`, optional W&B.

On GPUs it adds MFU and memory (torch.cuda peak allocation, NVML device memory); on CPU those
fields are absent rather than made up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

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


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites stay unconditional."""

    def __init__(self, run_dir: str, enabled: bool, wandb_cfg=None, config_dict=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if enabled and wandb_cfg is not None and wandb_cfg.wandb:
            self.wandb_run = _start_wandb(run_dir, wandb_cfg.wandb_project, config_dict)

    def truncate_after(self, step: int) -> None:
        """After a resume from `step`, drop lines the crashed run logged past it, so the file
        holds one line per step of the continued run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(_flatten(record), step=record["step"])
        print(format_line(record), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run_dir: str, project: str, config_dict):
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(
        project=project, name=Path(run_dir).name, dir=run_dir, mode=mode, config=config_dict
    )


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def format_line(record: dict) -> str:
    parts = [f"step {record['step']:>6}"]
    formats = {
        "loss": "loss {:.4f}",
        "lr": "lr {:.2e}",
        "grad_norm": "gnorm {:.3f}",
        "tokens_per_s": "tok/s {:,.0f}",
        "mfu": "mfu {:.1%}",
        "memory_gib": "mem {:.1f}GiB",
        "moe_aux_loss": "aux {:.4f}",
        "moe_z_loss": "z {:.2e}",
        "moe_max_expert_share": "max-expert {:.1%}",
    }
    for key, fmt in formats.items():
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    for name, value in (record.get("eval_loss") or {}).items():
        parts.append(f"eval[{name}] {value:.4f}")
    return "  ".join(parts)


class Throughput:
    """Tokens/s and MFU between two logged steps."""

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak = (
            peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        )
        self.nvml = NvmlMemory(device.index or 0) if device.type == "cuda" else None
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def measure(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        out = {"tokens_per_s": tokens_per_s}
        if self.peak is not None:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        if self.device.type == "cuda":
            out["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["nvml_memory_gib"] = self.nvml.used_gib()
        self.reset()
        return out
