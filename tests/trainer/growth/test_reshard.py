"""Grown checkpoints (written as one shard) load into 2-rank FSDP2 and TP layouts."""

from dataclasses import replace

import pytest
import torch

from tests.distributed import run_distributed
from tests.trainer.growth.helpers import TINY, load_model, rank_load_and_forward, save_source
from tests.trainer.growth.helpers import tokens as make_tokens
from trainer.growth import stack, upcycle
from trainer.model.config import MoEConfig

pytestmark = pytest.mark.slow


def test_grown_checkpoints_load_on_two_ranks(tmp_path):
    src = save_source(tmp_path / "dense")
    moe_cfg = replace(TINY, moe=MoEConfig(num_experts=4, top_k=2))
    moe = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, optimizer="copy")
    deep_cfg = replace(TINY, n_layers=5)
    deep = stack(src, tmp_path / "deep", method="dus", layers="0:3,1:3", optimizer="reset")
    batch = make_tokens(5)
    with torch.no_grad():
        expected = [load_model(moe_cfg, moe)(batch), load_model(deep_cfg, deep)(batch)]
    cases = [(moe_cfg, str(moe), 1), (deep_cfg, str(deep), 1), (moe_cfg, str(moe), 2)]
    per_rank = run_distributed(
        rank_load_and_forward, 2, args=(cases, batch, expected + expected[:1])
    )
    assert all(diff <= 1e-5 for diffs in per_rank for diff in diffs), per_rank
