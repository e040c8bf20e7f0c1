"""Expert-parallel config checks: one line naming the keys, before any process group."""

import pytest

from trainer.config_loader import load_config, validate_layout

MOE = ["model.moe.num_experts=4", "train.global_batch_size=16", "train.micro_batch_size=2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.ep=2"], "parallel.ep > 1 needs an MoE model"),
        ([*MOE, "parallel.ep=3"], r"model.moe.num_experts \(4\) is not divisible by parallel.ep"),
        ([*MOE, "parallel.ep=2", "parallel.strategy=ddp"], "parallel.strategy=fsdp"),
        ([*MOE, "parallel.ep=2", "parallel.tp=2"], "parallel.tp > 1 is not supported"),
        ([*MOE, "parallel.ep=2", "train.compile=true"], "train.compile=true with parallel.ep"),
        ([*MOE, "parallel.ep=0"], "parallel.ep must be >= 1"),
    ],
)
def test_impossible_expert_parallel_configs_name_their_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_expert_parallel_layout_needs_dp_divisible_by_ep():
    cfg = load_config(None, [*MOE, "parallel.ep=2"])
    for world in (2, 4):
        validate_layout(cfg, world)
    with pytest.raises(ValueError, match=r"data-parallel size 1 .* parallel.ep \(2\)"):
        validate_layout(cfg, 1)


def test_upcycling_mid_run_counts_the_experts_it_will_add():
    load_config(None, ["grow.at_step=2", "grow.num_experts=4", "parallel.ep=2"])
    with pytest.raises(ValueError, match="not divisible by parallel.ep"):
        load_config(None, ["grow.at_step=2", "grow.num_experts=3", "parallel.ep=2"])
