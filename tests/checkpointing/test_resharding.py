"""Resharding matrix: save under one parallel layout, load under another, bit-exact state."""

from __future__ import annotations

import pytest

from tests.checkpointing.helpers import run_cases
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow


def test_resharding_matrix(tmp_path):
    # 1 rank (this process, no process group): the plain model.
    run_cases(tmp_path, [("save", "plain", "plain1")])
    run_distributed(
        run_cases,
        2,
        args=(
            tmp_path,
            [
                ("save", "ddp", "ddp2"),
                ("save", "fsdp", "fsdp2"),
                ("save", "tp", "tp2"),
                ("load", "fsdp", "plain1"),  # 1 -> 2
            ],
        ),
    )
    run_distributed(
        run_cases,
        3,
        args=(
            tmp_path,
            [
                ("save", "fsdp", "fsdp3"),
                ("load", "fsdp", "fsdp2"),  # 2 -> 3
                ("load", "fsdp", "tp2"),  # TP=2 -> FSDP2 on 3 ranks
            ],
        ),
    )
    run_distributed(
        run_cases,
        2,
        args=(
            tmp_path,
            [
                ("load", "ddp", "fsdp3"),  # 3 -> 2
                ("load", "fsdp", "ddp2"),  # DDP -> FSDP2
                ("load", "ddp", "fsdp2"),  # FSDP2 -> DDP
            ],
        ),
    )
    run_cases(tmp_path, [("load", "plain", "ddp2")])  # 2 -> 1


def test_replicated_tensors_are_written_once(tmp_path):
    """DDP saves: every tensor has exactly one box, and rank 1 writes no duplicate of it."""
    import json

    run_distributed(run_cases, 2, args=(tmp_path, [("save", "ddp", "ddp2")]))
    index = json.loads((tmp_path / "ddp2" / "step-00000002" / "index.json").read_text())
    assert index["world_size"] == 2
    for name, tensor in index["tensors"].items():
        assert len(tensor["shards"]) == 1, name
