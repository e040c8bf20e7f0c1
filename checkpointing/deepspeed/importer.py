"""`perennial ckpt import` for DeepSpeed: a ZeRO checkpoint (engine.save_checkpoint) or a
ds_to_universal folder, written as one of our checkpoints.

Keys are ours (checkpointing/model_state.py), so the result loads into any layout:

    model.<name>                              fp32 master weights (DeepSpeed's, not the bf16 copy)
    optimizer.state.<name>.exp_avg|exp_avg_sq Adam moments
    optimizer.state.<name>.step               the parameter group's step
    optimizer.param_groups.<name>.<key>       JSON hyperparameters (not in universal folders)
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpointing.deepspeed.files import read_deepspeed
from checkpointing.manager import CheckpointManager
from checkpointing.model_state import MODEL_PREFIX, OPTIMIZER_PREFIX, _to_json

MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_to_tensors(src: Path) -> tuple[int, dict[str, torch.Tensor], dict, str]:
    """(step, our tensors, our optimizer JSON, source kind) for the DeepSpeed checkpoint at src."""
    state = read_deepspeed(Path(src))
    tensors: dict[str, torch.Tensor] = {}
    values: dict = {}
    for name, full in state.params.items():
        tensors[f"{MODEL_PREFIX}{name}"] = full["fp32"]
        for key in MOMENTS:
            tensors[f"{OPTIMIZER_PREFIX}state.{name}.{key}"] = full[key]
        tensors[f"{OPTIMIZER_PREFIX}state.{name}.step"] = torch.tensor(state.steps[name])
        for key, value in state.groups.get(name, {}).items():
            entry = f"{OPTIMIZER_PREFIX}param_groups.{name}.{key}"
            values[entry] = _to_json(entry, value)
    for name, buffer in state.buffers.items():
        tensors[f"{MODEL_PREFIX}{name}"] = buffer
    return state.step, tensors, values, state.kind


def import_deepspeed_checkpoint(src: str | Path, out_root: str | Path) -> Path:
    """Write the DeepSpeed checkpoint at `src` as a checkpoint under `out_root` (one process)."""
    src = Path(src).expanduser().resolve()
    step, tensors, values, kind = deepspeed_to_tensors(src)
    state = {
        "step": step,
        "tokens_seen": 0,
        "schedule_offset": 0,
        "phase": {},
        "optimizer": values,
        "source": {"format": f"deepspeed-{kind}", "path": str(src)},
    }
    return CheckpointManager(out_root, keep=1).save(step, tensors, state)
