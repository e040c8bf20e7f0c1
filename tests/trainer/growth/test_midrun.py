"""Mid-run growth (`grow.at_step`) through `perennial train`, and training from grown checkpoints
on another layout. Real processes, tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from checkpointing.format import read_index
from checkpointing.reading import ShardFiles
from tests.trainer.growth.helpers import TINY, save_source
from tests.trainer.runs import losses, train
from trainer.config import JobConfig
from trainer.growth import stack, upcycle
from trainer.growth.midrun import adopt_grown_init, check_grow
from trainer.model.hf_export import export_hf

JOB = ["schedule.total_steps=4", "checkpoint.persist_interval=1"]
UPCYCLE = ["grow.at_step=2", "grow.kind=upcycle", "grow.num_experts=4", "grow.top_k=2"]


def all_tensors(checkpoint) -> dict[str, torch.Tensor]:
    index = read_index(checkpoint)
    with ShardFiles(checkpoint, index) as files:
        return {name: files.read_tensor(name) for name in index.tensors}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_midrun_upcycle_equals_offline_and_resumes_grown(tmp_path, data_cache):
    dense = tmp_path / "dense"
    train(dense, data_cache, 1, *JOB, "train.max_steps=2")
    offline = upcycle(dense, tmp_path / "up", num_experts=4, top_k=2, optimizer="copy")
    whole = tmp_path / "whole"
    records = train(whole, data_cache, 1, *JOB, *UPCYCLE, "train.max_steps=4")
    grown_at_2 = whole / "checkpoints" / "step-00000002"
    assert_same_tensors(all_tensors(grown_at_2), all_tensors(offline))
    # stopped after growth, then resumed: the grown model continues bitwise
    split = tmp_path / "split"
    train(split, data_cache, 1, *JOB, *UPCYCLE, "train.max_steps=3")
    resumed = train(split, data_cache, 1, *JOB, *UPCYCLE, "train.max_steps=4")
    assert losses(resumed) == losses(records)
    final = "step-00000004"
    assert_same_tensors(
        all_tensors(split / "checkpoints" / final), all_tensors(whole / "checkpoints" / final)
    )
    # the grown checkpoint describes its model: it exports as Mixtral
    export_hf(whole, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4


@pytest.mark.slow
def test_midrun_stack_on_two_ranks_resumes_on_one(tmp_path, data_cache):
    grow = ["grow.at_step=2", "grow.kind=stack", "grow.method=gstack", "grow.factor=2"]
    one = train(tmp_path / "one", data_cache, 1, *JOB, *grow, "train.max_steps=4")
    two = tmp_path / "two"
    train(two, data_cache, 2, *JOB, *grow, "train.max_steps=3")
    index = read_index(two / "checkpoints" / "step-00000003")
    assert "model.layers.3.attention.wq.weight" in index.tensors  # 2 layers grew to 4
    resumed = train(two, data_cache, 1, *JOB, *grow, "train.max_steps=4")
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(losses(one)[step], rel=1e-4), step


@pytest.mark.slow
def test_grown_checkpoints_train_on_two_ranks(tmp_path, data_cache):
    """`perennial grow` output warm-starts an FSDP2 run on 2 ranks (saved on 1); the run takes
    the grown shape (experts, layers) from the checkpoint, no model overrides needed."""
    dense = tmp_path / "dense"
    train(dense, data_cache, 1, *JOB, "train.max_steps=2")
    start = ["train.max_steps=2", "init.load_optimizer=true"]
    base = losses(train(tmp_path / "base", data_cache, 1, *JOB, *start, f"init.from={dense}"))
    up = upcycle(dense, tmp_path / "up", num_experts=4, top_k=2)
    moe = losses(train(tmp_path / "moe", data_cache, 2, *JOB, *start, f"init.from={up}"))
    assert 0 < moe[1] - base[1] < 0.05  # the same LM loss (exact upcycling) + aux and z losses
    deep = stack(dense, tmp_path / "deep", method="interleave-identity", every=1)
    stacked = losses(train(tmp_path / "stacked", data_cache, 2, *JOB, *start, f"init.from={deep}"))
    assert stacked[1] == pytest.approx(base[1], rel=1e-4)  # identity blocks: the same function


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"kind": "widen"}, "grow.kind"),
        ({"top_k": 9}, "grow.top_k"),
        ({"kind": "stack", "method": "dus", "layers": "0:9"}, "grow.layers"),
        ({"at_step": 10}, "train.max_steps"),
        ({"optimizer": "sgd"}, "grow.optimizer"),
    ],
)
def test_bad_grow_settings_name_the_key(overrides, key):
    cfg = JobConfig()
    cfg.model.vocab_size = 258
    cfg.train.max_steps = 10
    cfg.grow = replace(cfg.grow, **{"at_step": 5, **overrides})
    with pytest.raises(ValueError, match=key):
        check_grow(cfg)


@pytest.mark.parametrize(
    "section, key, value", [("parallel", "strategy", "deepspeed"), ("checkpoint", "interval", 5)]
)
def test_growth_refuses_what_it_cannot_rebuild(section, key, value):
    cfg = JobConfig()
    cfg.grow.at_step = 1
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError, match=f"{section}.{key}"):
        check_grow(cfg)



@pytest.mark.slow
def test_identity_expansion_with_frozen_old_layers_trains_only_the_new(tmp_path, data_cache):
    dense = tmp_path / "dense"
    train(dense, data_cache, 1, *JOB, "train.max_steps=2")
    grown = stack(dense, tmp_path / "deep", method="interleave-identity", freeze_old=True)
    job = ["model.n_layers=4", "model.frozen_layers=[0,2]", f"init.from={grown}",
           "init.load_optimizer=true", "train.max_steps=2"]  # fmt: skip
    run = tmp_path / "run"
    train(run, data_cache, 2, *JOB, *job)
    before, after = all_tensors(grown), all_tensors(run / "checkpoints" / "step-00000002")
    for layer, frozen in ((0, True), (1, False), (2, True), (3, False)):
        name = f"model.layers.{layer}.attention.wq.weight"
        assert torch.equal(before[name], after[name]) == frozen, name
    assert not any(k.startswith("optimizer.state.layers.0.") for k in after)


def test_grown_init_from_sets_the_model_shape(tmp_path):
    src = save_source(tmp_path / "dense")
    cfg = JobConfig()
    cfg.model = replace(TINY)
    cfg.init.from_ = str(src)
    assert adopt_grown_init(cfg) == []  # not a grown checkpoint: the config stands
    cfg.init.from_ = str(upcycle(src, tmp_path / "up", num_experts=3, top_k=2))
    assert adopt_grown_init(cfg) == ["model.moe.num_experts=3"]
    assert cfg.model.moe.num_experts == 3 and cfg.model.dim == TINY.dim
    cfg.init.from_ = str(stack(src, tmp_path / "deep", method="dus", layers="0:3,2:3"))
    assert adopt_grown_init(cfg) == ["model.n_layers=4", "model.moe.num_experts=0"]
