"""Config checks for expert and pipeline parallelism, run before any process group starts;
each error is one line naming the keys (called from trainer.config_loader.validate /
validate_layout)."""

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
    ep = cfg.parallel.ep
    dp = data_parallel_size(cfg, world_size)
    if ep > 1 and dp % ep:
        raise ValueError(
            f"data-parallel size {dp} (world size {world_size} / (parallel.pp x parallel.tp)) "
            f"is not divisible by parallel.ep ({ep})"
        )


PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.pp * cfg.parallel.tp)


def pipeline_stages(cfg: JobConfig) -> int:
    """Stages in all: pp, or 2 x pp for Interleaved1F1B (two stages per rank)."""
    p = cfg.parallel
    return p.pp * (2 if p.pp_schedule == "Interleaved1F1B" else 1)


def check_pipeline_parallel(cfg: JobConfig) -> None:
    p = cfg.parallel
    if p.pp < 1 or p.pp_microbatches < 0:
        raise ValueError(f"parallel.pp must be >= 1 and parallel.pp_microbatches >= 0 "
                         f"(0 = auto), got {p.pp} and {p.pp_microbatches}")
    if p.pp_schedule not in PP_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, "
                         f"got {p.pp_schedule!r}")
    if p.pp == 1:
        return
    stages = pipeline_stages(cfg)
    if cfg.model.n_layers < stages:
        raise ValueError(f"model.n_layers ({cfg.model.n_layers}) is fewer than the pipeline "
                         f"stages ({stages}: parallel.pp={p.pp}, parallel.pp_schedule="
                         f"{p.pp_schedule}); every stage needs a layer")
    unsupported = {
        "parallel.strategy=" + p.strategy: p.strategy != "fsdp",
        "parallel.ep > 1": p.ep > 1,
        "an MoE model (model.moe.num_experts)": planned_experts(cfg) > 0,
        "model.tie_embeddings (the embedding and head live on different stages)":
            cfg.model.tie_embeddings,
        "checkpoint.interval > 0 (memory snapshots; disk checkpoints work)":
            cfg.checkpoint.memory_snapshots(),
        "grow.at_step > 0": cfg.grow.at_step > 0,
    }
    for what, present in unsupported.items():
        if present:
            raise ValueError(f"parallel.pp > 1 is not supported with {what} yet")


def pipeline_microbatches(cfg: JobConfig, dp: int) -> int:
    """parallel.pp_microbatches resolved (0 = one per train.micro_batch_size sequences)."""
    per_rank = cfg.train.global_batch_size // dp
    return cfg.parallel.pp_microbatches or per_rank // cfg.train.micro_batch_for(dp)


def check_pipeline_layout(cfg: JobConfig, world_size: int) -> None:
    p = cfg.parallel
    if world_size % (p.pp * p.tp):
        raise ValueError(f"parallel.pp ({p.pp}) x parallel.tp ({p.tp}) does not divide the "
                         f"world size {world_size} (pp x dp x tp must equal it)")
    if p.pp == 1:
        return
    dp = data_parallel_size(cfg, world_size)
    per_rank = cfg.train.global_batch_size // dp
    micro = pipeline_microbatches(cfg, dp)
    if per_rank % micro or micro < pipeline_stages(cfg):
        raise ValueError(
            f"parallel.pp_microbatches ({micro}) must divide train.global_batch_size / "
            f"data-parallel size ({per_rank}) and be >= the pipeline stages "
            f"({pipeline_stages(cfg)})")
