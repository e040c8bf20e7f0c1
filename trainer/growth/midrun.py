"""Mid-run growth (`grow.at_step`): the trainer grows its live model and continues.

At the step boundary `grow.at_step` (after that step's optimizer update, before its checkpoint)
every rank gathers the full model and optimizer tensors, applies the same in-memory transform as
`perennial grow` (`grow_tensors`, trainer/growth/transforms.py), rebuilds the model, parallelizes
it again and rebuilds the optimizer, loads the grown values into their shards, and commits a
checkpoint at that step. So every checkpoint of the run at step >= at_step holds the grown model
and every earlier one the source model; a restarted run picks its model by that rule
(`model_config_for_resume`) and resumes whichever it finds. Data position, schedule, step and
RNG are not touched by growth. Every rank holds the whole state once on the CPU while growing,
so this is for models that fit in host memory; grow bigger ones offline (`perennial grow`).

`adopt_grown_init`: a run warm-started from a grown checkpoint (`init.from`) takes the grown
shape (layers, experts) from that checkpoint's saved config.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch.distributed.tensor import DTensor, distribute_tensor

from checkpointing import CheckpointDamaged, resolve_checkpoint
from checkpointing.commit import committed_dirs
from checkpointing.format import STATE_FILE, read_json
from trainer.config import GrowConfig, JobConfig
from trainer.growth.files import model_config_from_dict
from trainer.growth.stack import StackOptions, stacked_config
from trainer.growth.transforms import carry_moments, grow_tensors
from trainer.growth.upcycle import UpcycleOptions, check_upcycle, upcycled_config
from trainer.model.config import ModelConfig

KINDS = ("upcycle", "stack")
GROWN_MODEL_KEYS = ("n_layers", "frozen_layers")
GROWN_MOE_KEYS = ("num_experts", "top_k", "every_n_layers", "router", "hidden_dim")


def growth_options(grow: GrowConfig) -> UpcycleOptions | StackOptions:
    if grow.kind == "upcycle":
        return UpcycleOptions(
            grow.num_experts,
            grow.top_k,
            grow.granularity,
            grow.router_init,
            grow.every,
            grow.router,
        )
    return StackOptions(grow.method, grow.factor, grow.every, grow.layers, grow.freeze_old)


def check_grow(cfg: JobConfig) -> ModelConfig | None:
    """The grown model config, or None when growth is off; ValueError naming `grow.*` keys."""
    grow = cfg.grow
    if grow.at_step < 0:
        raise ValueError(f"grow.at_step must be >= 0 (0 = off), got {grow.at_step}")
    if grow.at_step == 0:
        return None
    if grow.kind not in KINDS:
        raise ValueError(f"grow.kind must be one of {KINDS}, got {grow.kind!r}")
    if grow.at_step >= cfg.train.max_steps:
        raise ValueError(
            f"grow.at_step ({grow.at_step}) must be < train.max_steps ({cfg.train.max_steps})"
        )
    if cfg.parallel.strategy == "deepspeed":
        raise ValueError("grow.at_step is not supported with parallel.strategy=deepspeed")
    if cfg.checkpoint.memory_snapshots():
        raise ValueError(
            "grow.at_step is not supported with checkpoint.interval > 0 (memory snapshots: "
            "the keeper's slots are sized for the model before growth)"
        )
    try:
        carry_moments(grow.optimizer)
        opts = growth_options(grow)
        if grow.kind == "upcycle":
            check_upcycle(cfg.model, opts)
            return upcycled_config(cfg.model, opts)
        return stacked_config(cfg.model, opts)
    except ValueError as err:  # the transforms name CLI flags: --top-k is grow.top_k
        message = re.sub(r"--([a-z-]+)", lambda m: "grow." + m.group(1).replace("-", "_"), str(err))
        raise ValueError(f"grow: {message}") from None


def model_config_for_resume(cfg: JobConfig) -> ModelConfig:
    """The model this run resumes: the grown one when its newest checkpoint is at or after
    grow.at_step, else `cfg.model`."""
    grown = check_grow(cfg)
    if grown is None or not cfg.checkpoint.enabled:
        return cfg.model
    newest = committed_dirs(Path(cfg.checkpoint.dir))
    if newest and newest[0][0] >= cfg.grow.at_step:
        return grown
    return cfg.model


def adopt_grown_init(cfg: JobConfig) -> list[str]:
    """With `init.from` a checkpoint written by growth (`perennial grow`, or a run that grew at
    grow.at_step), take the model's shape keys from it, so `init.from=UPCYCLED` needs no
    `model.moe.*` overrides. Returns the keys changed."""
    if not cfg.init.from_:
        return []
    try:
        path = resolve_checkpoint(cfg.init.from_)
        state = read_json(path / STATE_FILE)["global_state"]
    except (ValueError, KeyError, CheckpointDamaged):
        return []  # the warm start reports what is wrong with it
    phase = state.get("phase") or {}
    if not ({"grown", "grown_at"} & set(phase)) or "config" not in state:
        return []
    saved = model_config_from_dict(yaml.safe_load(state["config"])["model"], path)
    changed = []
    for section, ours, theirs, keys in (
        ("model", cfg.model, saved, GROWN_MODEL_KEYS),
        ("model.moe", cfg.model.moe, saved.moe, GROWN_MOE_KEYS),
    ):
        for key in keys:
            if getattr(ours, key) != getattr(theirs, key):
                setattr(ours, key, getattr(theirs, key))
                changed.append(f"{section}.{key}={getattr(theirs, key)}")
    return changed


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole, on the CPU (a collective when they are DTensors)."""
    out = {}
    for name, value in tensors.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = full.detach().cpu().clone()
    return out


def fill_shards(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copy full `values` into `targets` (DTensors receive their own shard)."""
    missing = sorted(set(targets) - set(values))
    if missing:
        raise ValueError(f"growth produced no value for {missing[:5]}")
    for name, target in targets.items():
        value = values[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements).to_local()
            target = target.to_local()
        target.copy_(value.reshape(target.shape))


def grow_trainer(trainer) -> None:
    """Grow `trainer`'s model in place at the current step boundary (collective)."""
    cfg = trainer.cfg
    tensors, optim_json = trainer.state.tensors()
    source = full_state(tensors)
    del tensors
    grown = grow_tensors(
        cfg.grow.kind, source, cfg.model, growth_options(cfg.grow), cfg.grow.optimizer, optim_json
    )
    del source
    cfg.model = replace(grown.model_config)
    trainer.rebuild_for_growth()
    targets, _ = trainer.state.tensors()
    fill_shards(targets, grown.tensors)
    trainer.state.load_tensors(targets, grown.optimizer_json)
    trainer.state.phase = {
        **trainer.state.phase,
        "grown_at": {"step": trainer.state.step, "kind": cfg.grow.kind},
    }
