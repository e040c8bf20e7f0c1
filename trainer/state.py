"""The training state: the one object that owns everything a bitwise resume needs.

`TrainState` holds the model and optimizer (keyed by the plain model's parameter names), the
schedule, the data stream (its global cursor), the per-rank RNG and the progress (step, tokens,
schedule offset, phase). The Trainer builds the parts and steps them; `Checkpointer` and
`Snapshots` (trainer/checkpointer.py, trainer/snapshots.py) receive this object and move it
through the checkpoint layer. None of them calls another's private methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from checkpointing import (
    LoadResult,
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
)
from checkpointing.collectives import all_gather_strings
from trainer.distributed import DistInfo, rng_state, seed_rng, set_rng_state


@dataclass
class TrainState:
    model: nn.Module
    """The parallelized model (or the DeepSpeed engine) that trains."""
    plain_model: nn.Module
    """The same model before parallelize: parameter names, FLOPs, aux losses."""
    optimizer: torch.optim.Optimizer
    schedule: Any
    """trainer.schedule.Schedule: lr(step), state_dict / load_state_dict."""
    data: Any
    """trainer.data.Data: the batches and their cursor (state_dict / load_state_dict)."""
    dist: DistInfo
    layout: dict
    """world_size, tp, dp, strategy: saved with every checkpoint, compared on restore."""
    config_yaml: str
    """The run's config as saved in checkpoints (rendered once, ~20 ms: growth changes it)."""
    deepspeed: Any = None
    """trainer.parallel.deepspeed_backend.DeepSpeedBackend under parallel.strategy=deepspeed."""
    stage_group: Any = None
    """Ranks that hold other parameters than this one (the pipeline group), or None: each
    saves only its own tensors, and the optimizer JSON saved is the union of theirs."""
    step: int = 0
    tokens_seen: int = 0
    schedule_offset: int = 0
    """Steps of an earlier phase whose schedule this run continues (init.load_schedule)."""
    phase: dict = field(default_factory=dict)

    def replace_model(self, model, plain_model, optimizer, deepspeed, config_yaml: str) -> None:
        """Mid-run growth: the rebuilt model and optimizer take over (values loaded later)."""
        self.model, self.plain_model, self.optimizer = model, plain_model, optimizer
        self.deepspeed, self.config_yaml = deepspeed, config_yaml

    # -- what gets saved ------------------------------------------------------------------
    def tensors(self, with_optimizer: bool = True) -> tuple[dict, dict]:
        """This rank's tensors (`model.*`, `optimizer.state.*`) and the optimizer's JSON."""
        if self.deepspeed is not None:  # ZeRO partitions as boxes
            return self.deepspeed.tensors(with_optimizer)
        tensors = model_tensors(self.model)
        optim_json: dict = {}
        if with_optimizer:
            optim_tensors, optim_json = optimizer_tensors(self.model, self.optimizer)
            tensors.update(optim_tensors)
        return tensors, optim_json

    def global_state(self, optim_json: dict) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "schedule_offset": self.schedule_offset,
            "phase": self.phase,
            "schedule": self.schedule.state_dict(),
            "data": self.data.state_dict(),
            "optimizer": self._union_over_stages(optim_json),
            "layout": self.layout,
            "config": self.config_yaml,
        }

    def _union_over_stages(self, optim_json: dict) -> dict:
        """Rank 0's JSON covers only its own parameters: merge every stage's (O(pp) small
        records; the keys of different stages are disjoint, those of one stage equal)."""
        if self.stage_group is None:
            return optim_json
        merged: dict = {}
        for text in all_gather_strings(json.dumps(optim_json), self.stage_group):
            merged.update(json.loads(text))
        return merged

    def rank_state(self) -> dict:
        return {"rng": rng_state(self.dist.device)}

    # -- what gets loaded -----------------------------------------------------------------
    def load_tensors(self, tensors: dict, optim_json: dict | None) -> None:
        """Loaded `tensors` into the model; into the optimizer too unless optim_json is None."""
        if self.deepspeed is not None:
            self.deepspeed.apply(tensors, optim_json or {})
            return
        apply_model_tensors(self.model, tensors)
        if optim_json is not None:
            apply_optimizer_tensors(self.model, self.optimizer, tensors, optim_json)

    def resume(self, result: LoadResult, seed: int) -> None:
        """Everything but the tensors from a checkpoint of this run (a resume)."""
        saved = result.global_state
        self.step = saved["step"]
        self.tokens_seen = saved["tokens_seen"]
        self.schedule_offset = saved["schedule_offset"]
        self.phase = saved["phase"]
        self.schedule.load_state_dict(saved["schedule"])
        self.data.load_state_dict(saved["data"])
        rank = self.dist.rank
        if saved["layout"] == self.layout:
            set_rng_state(result.rank_states[rank]["rng"], self.dist.device)
        else:  # another layout: a well-defined stream for (seed, rank, step)
            seed_rng(seed, rank, self.step)
