"""Meta-device build: each layout materialises only its shards, and the initial weights, gathered,
are bitwise those of the single-process model for the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.distributed import run_distributed
from trainer.config import JobConfig
from trainer.model import Llama, ModelConfig
from trainer.model.config import MoEConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.materialize import build_parallel_llama

SEED = 11


def model_config() -> ModelConfig:
    # Uneven on purpose: vocab 101 and ffn 96 do not split evenly over 3 ranks; layer 1 is MoE
    # (3-D stacked experts, 5 experts over 3 ranks).
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_dim=96,
                       max_seq_len=16, moe=MoEConfig(num_experts=5, top_k=2, every_n_layers=2))


def job(strategy: str, tp: int = 1, zero_stage: int = 3) -> JobConfig:
    cfg = JobConfig()
    cfg.model = model_config()
    cfg.train.seed = SEED
    cfg.train.device = "cpu"
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 12, 2
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.zero_stage = strategy, tp, zero_stage
    return cfg


def gathered_weights(strategy: str, tp: int) -> dict:
    """On every rank: build; rank 0 returns the full weights, the others their local sizes."""
    world = dist.get_world_size()
    cfg = job(strategy, tp)
    dims = ParallelDims(world, tp, strategy)
    dims.build_mesh("cpu")
    plain, _ = build_parallel_llama(cfg, dims, torch.device("cpu"), torch.float32)
    local = {}
    full = {}
    for name, param in plain.named_parameters():
        if strategy == "deepspeed":
            import deepspeed

            local[name] = param.ds_tensor.numel()
            with deepspeed.zero.GatheredParameters([param]):
                full[name] = param.detach().clone()
        elif isinstance(param, DTensor):
            local[name] = param.to_local().numel()
            full[name] = param.full_tensor().detach().clone()
        else:
            local[name] = param.numel()
            full[name] = param.detach().clone()
    # numpy arrays travel by value (torch tensors would go through shared memory the exiting
    # rank takes with it)
    return {k: v.numpy() for k, v in full.items()} if dist.get_rank() == 0 else local


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    model = Llama(model_config())
    model.init_weights(SEED)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise(weights: dict, reference: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        assert torch.equal(torch.from_numpy(value), reference[name]), name


@pytest.mark.parametrize(
    "world, strategy, tp",
    [(1, "fsdp", 1), (2, "ddp", 1), (3, "fsdp", 1), (2, "fsdp", 2)],
    ids=["single", "ddp-2", "fsdp-3-uneven", "tp-2"],
)
def test_initial_weights_are_bitwise_equal_on_every_layout(reference, world, strategy, tp):
    results = run_distributed(gathered_weights, world, args=(strategy, tp))
    assert_bitwise(results[0], reference)
    if strategy == "fsdp" and world == 3:  # each rank materialised only its shard
        total = sum(p.numel() for p in reference.values())
        assert max(sum(r.values()) for r in results[1:]) < 0.5 * total


def test_zero3_partitioned_at_construction_matches(reference, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = run_distributed(gathered_weights, 2, args=("deepspeed", 1))
    assert_bitwise(results[0], reference)
    total = sum(p.numel() for p in reference.values())
    assert sum(results[1].values()) <= total // 2 + len(reference)  # ceil(numel / 2) each


def test_a_different_seed_gives_different_weights(reference):
    model = Llama(model_config())
    model.init_weights(SEED + 1)
    weight = dict(model.named_parameters())["layers.0.attention.wq.weight"]
    assert not torch.equal(weight, reference["layers.0.attention.wq.weight"])
    assert abs(weight.std().item() - 0.02) < 0.004
