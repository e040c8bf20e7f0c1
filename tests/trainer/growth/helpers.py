"""Tiny Llamas and universal checkpoints of them (weights + one AdamW step) for growth tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from checkpointing import (
    CheckpointManager,
    apply_model_tensors,
    model_tensors,
    optimizer_tensors,
)
from trainer.checkpointer import expert_layouts
from trainer.config import JobConfig
from trainer.config_loader import to_yaml
from trainer.model import Llama, ModelConfig

TINY = ModelConfig(
    dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=41, max_seq_len=16, ffn_dim=48
)
STEP = 7


def build(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def tokens(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(
        0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


def trained(cfg: ModelConfig = TINY, seed: int = 0):
    """A model and AdamW after one step, so every moment is non-zero."""
    model = build(cfg, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits = model(tokens(seed + 1))
    (logits.square().mean() + model.aux_loss()).backward()
    optimizer.step()
    return model, optimizer


def full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = model_tensors(model)
    optim, optim_json = optimizer_tensors(model, optimizer)
    return {**tensors, **optim}, optim_json


def save_source(root: Path, cfg: ModelConfig = TINY, with_optimizer: bool = True) -> Path:
    model, optimizer = trained(cfg)
    tensors, optim_json = full_state(model, optimizer)
    if not with_optimizer:
        tensors, optim_json = model_tensors(model), {}
    job = JobConfig(model=replace(cfg))
    state = {"config": to_yaml(job), "optimizer": optim_json, "step": STEP, "phase": {}}
    manager = CheckpointManager(root, layouts=expert_layouts(cfg))
    return manager.save(STEP, tensors, state)


def load_model(cfg: ModelConfig, path: Path) -> Llama:
    """A fresh model of `cfg` with the weights of checkpoint `path` (single process)."""
    model = Llama(cfg)
    tensors = model_tensors(model)
    CheckpointManager(path.parent, layouts=expert_layouts(cfg)).load(path, tensors)
    apply_model_tensors(model, tensors)
    return model


def load_all(cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor of `path`, loaded through a model of `cfg`."""
    model = Llama(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tensors, _ = full_state(model, optimizer)
    CheckpointManager(path.parent, layouts=expert_layouts(cfg)).load(path, tensors)
    return tensors


def rank_load_and_forward(cases: list, batch: torch.Tensor, expected: list) -> list[float]:
    """On every rank of a spawned group: build each (config, checkpoint, tp) model under FSDP2
    (tp=1) or TP (tp=2), load the grown checkpoint (weights and optimizer state) and return the
    largest logit difference from `expected` per case (floats: tensors cannot outlive a rank)."""
    import torch.distributed as dist

    from checkpointing import apply_optimizer_tensors
    from trainer.parallel.dims import ParallelDims
    from trainer.parallel.parallelize import parallelize_llama

    results = []
    for (cfg, path, tp), want in zip(cases, expected):
        dims = ParallelDims(dist.get_world_size(), tp=tp, strategy="fsdp")
        dims.build_mesh("cpu")
        model = parallelize_llama(build(cfg, seed=99), dims)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tensors, _ = full_state(model, optimizer)
        result = CheckpointManager(Path(path).parent, layouts=expert_layouts(cfg)).load(
            path, tensors
        )
        apply_model_tensors(model, tensors)
        apply_optimizer_tensors(model, optimizer, tensors, result.global_state["optimizer"])
        with torch.no_grad():
            results.append((model(batch) - want).abs().max().item())
    return results
