"""parallel.strategy=deepspeed: the plain model and our AdamW, trained through a ZeRO engine.

Our config decides; DeepSpeed's config is derived from it (docs/architecture.md, DeepSpeed):

    train.global_batch_size            -> train_batch_size
    train.micro_batch_size             -> train_micro_batch_size_per_gpu
    global / (micro x world size)      -> gradient_accumulation_steps
    train.grad_clip                    -> gradient_clipping
    train.mixed_precision (resolved)   -> bf16.enabled
    parallel.zero_stage                -> zero_optimization.stage
    optim.*                            -> our torch.optim.AdamW, passed as the client optimizer
    schedule.*                         -> none: the trainer sets every group's lr each step

torch's AdamW (not DeepSpeed's FusedAdam/CPUAdam) is the client optimizer: ZeRO steps it on flat
fp32 partitions with the same elementwise update as FSDP2/DDP, so the runs agree to fp32
rounding and the moments keep torch's names. `parallel.ds_config` adds a user's DeepSpeed JSON;
a value that contradicts ours is a ValueError naming both keys ("auto" means "take ours").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # must be set before deepspeed is first imported
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed sections ours own entirely: a user's section would silently replace our optimizer
# or schedule.
_OWNED_SECTIONS = {"optimizer": "optim.*", "scheduler": "schedule.*"}


def ds_config_for(cfg, world_size: int, param_dtype: torch.dtype) -> tuple[dict, dict[str, str]]:
    """(DeepSpeed config, DeepSpeed key -> the key of ours it comes from)."""
    t = cfg.train
    micro = t.micro_batch_for(world_size)  # DeepSpeed runs with parallel.tp=1: dp = world
    accumulation = t.global_batch_size // (micro * world_size)
    fields = {
        "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, "train.global_batch_size"),
        "gradient_clipping": (float(t.grad_clip), "train.grad_clip"),
        "bf16.enabled": (param_dtype == torch.bfloat16, "train.mixed_precision"),
        "zero_optimization.stage": (cfg.parallel.zero_stage, "parallel.zero_stage"),
        "zero_allow_untested_optimizer": (True, "optim.name"),
    }
    config: dict[str, Any] = {}
    for dotted, (value, _) in fields.items():
        _set_dotted(config, dotted, value)
    return config, {dotted: ours for dotted, (_, ours) in fields.items()}


def merged_ds_config(cfg, world_size: int, param_dtype: torch.dtype) -> dict:
    """Our DeepSpeed config, plus the user's `parallel.ds_config` JSON where it does not clash."""
    ours, sources = ds_config_for(cfg, world_size, param_dtype)
    path = cfg.parallel.ds_config
    if not path:
        return ours
    user = load_user_ds_config(path)
    for section, owner in _OWNED_SECTIONS.items():
        if section in user:
            raise ValueError(f"{path}: DeepSpeed key {section!r} conflicts with {owner}; remove it")
    for dotted, value in _flatten(user).items():
        if dotted in sources and value != "auto" and value != _get_dotted(ours, dotted):
            raise ValueError(
                f"{path}: DeepSpeed key {dotted}={value!r} conflicts with "
                f"{sources[dotted]} (which gives {_get_dotted(ours, dotted)!r})"
            )
    merged = json.loads(json.dumps(user))
    for dotted in sources:
        _set_dotted(merged, dotted, _get_dotted(ours, dotted))
    return merged


def load_user_ds_config(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"parallel.ds_config: {path} does not exist")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"parallel.ds_config: {path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ValueError(f"parallel.ds_config: {path} must hold a JSON object")
    return user


def check_ds_config(cfg, world_size: int) -> None:
    """Validate `parallel.ds_config` against ours before any process starts (ValueError)."""
    if cfg.parallel.strategy != "deepspeed":
        return
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and cfg.train.device != "cpu" else "fp32"
    merged_ds_config(cfg, world_size, torch.bfloat16 if precision == "bf16" else torch.float32)


class DeepSpeedBackend:
    """What the Trainer needs from a ZeRO engine: the module to call, one optimizer step per
    global batch, and the engine's partitions as our universal checkpoint tensors.

    `optimizer` stays our AdamW: ZeRO re-points its groups at the flat fp32 partitions, so the
    trainer's per-step `group["lr"] = ...` reaches the update as under FSDP2/DDP."""

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 world_size: int, param_dtype: torch.dtype) -> None:
        import deepspeed

        config = merged_ds_config(cfg, world_size, param_dtype)
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.optimizer = optimizer

    def train_step(self, micro_batches, forward_loss) -> tuple[torch.Tensor, float]:
        """One optimizer step: the engine scales each micro-batch loss by 1/accumulation,
        reduces at the accumulation boundary, clips and steps. Returns (mean loss on this rank,
        global grad norm before clipping)."""
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches per step, DeepSpeed expects "
                             f"{self.engine.gradient_accumulation_steps()}")
        loss_sum = None
        for inputs, targets in micro_batches:
            loss = forward_loss(inputs, targets)
            self.engine.backward(loss)
            self.engine.step()
            part = loss.detach() / len(micro_batches)
            loss_sum = part if loss_sum is None else loss_sum + part
        norm = self.engine.get_global_grad_norm()
        return loss_sum, float(norm) if norm is not None else float("nan")

    def tensors(self, with_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """Checkpoint keys (`model.*`, `optimizer.*`) over this rank's ZeRO partitions."""
        from checkpointing.deepspeed.live import deepspeed_tensors

        tensors, values = deepspeed_tensors(self.engine)
        if not with_optimizer:
            return {k: v for k, v in tensors.items() if k.startswith("model.")}, {}
        return tensors, values

    def apply(self, tensors: dict[str, Any], values: dict[str, Any]) -> None:
        """Finish a load into the views `tensors` returned."""
        from checkpointing.deepspeed.live import apply_deepspeed_tensors

        apply_deepspeed_tensors(self.engine, tensors, values)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _get_dotted(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value
