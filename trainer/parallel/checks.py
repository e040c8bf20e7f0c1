"""Config checks for expert parallelism, run before any process group starts; each error is
one line naming the keys (called from trainer.config_loader.validate / validate_layout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import JobConfig


def planned_experts(cfg: JobConfig) -> int:
    """Experts per MoE layer the run will have: the model's, or those a mid-run upcycle adds."""
    if cfg.model.moe.num_experts:
        return cfg.model.moe.num_experts
    if cfg.grow.at_step > 0 and cfg.grow.kind == "upcycle":
        return cfg.grow.num_experts * cfg.grow.granularity
    return 0


def check_expert_parallel(cfg: JobConfig) -> None:
    p = cfg.parallel
    if p.ep < 1:
        raise ValueError(f"parallel.ep must be >= 1, got {p.ep}")
    if p.ep == 1:
        return
    experts = planned_experts(cfg)
    if not experts:
        raise ValueError("parallel.ep > 1 needs an MoE model (model.moe.num_experts > 0)")
    if experts % p.ep:
        raise ValueError(
            f"model.moe.num_experts ({experts}) is not divisible by parallel.ep ({p.ep})"
        )
    if p.strategy != "fsdp":
        raise ValueError(f"parallel.ep > 1 needs parallel.strategy=fsdp, got {p.strategy!r}")
    if p.tp > 1:
        raise ValueError("parallel.ep > 1 with parallel.tp > 1 is not supported yet")
    if cfg.train.compile:
        raise ValueError(
            "train.compile=true with parallel.ep > 1 is not supported yet (the expert "
            "all-to-all runs in module hooks outside the compiled block); use one of them"
        )


def check_expert_parallel_layout(cfg: JobConfig, world_size: int) -> None:
    ep, tp = cfg.parallel.ep, cfg.parallel.tp
    dp = world_size // tp
    if ep > 1 and dp % ep:
        raise ValueError(
            f"data-parallel size {dp} (world size {world_size} / parallel.tp) is not "
            f"divisible by parallel.ep ({ep})"
        )
