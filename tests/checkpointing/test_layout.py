"""Layout declarations: fused qkv + padded vocab under TP=2 <-> unfused/unpadded on 1 rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from checkpointing import CheckpointManager, Fused, Padded, Stacked
from tests.distributed import run_distributed

Q, K, V, IN, VOCAB, PADDED, DIM = 6, 4, 4, 7, 11, 12, 5
FUSED = Fused("wqkv.weight", ("wq.weight", "wk.weight", "wv.weight"), (Q, K, V))
LAYOUTS = (FUSED, Padded("embed.weight", VOCAB), Stacked("experts", 3))


def logical() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "model.wq.weight": torch.randn(Q, IN, generator=gen),
        "model.wk.weight": torch.randn(K, IN, generator=gen),
        "model.wv.weight": torch.randn(V, IN, generator=gen),
        "model.embed.weight": torch.randn(VOCAB, DIM, generator=gen),
        "model.experts": torch.randn(3, 4, 2, generator=gen),
    }


def tp_tensors(fill: float | None = None) -> dict[str, torch.Tensor]:
    """The TP=2 in-memory form: each rank holds concat(wq_r, wk_r, wv_r) and a padded vocab."""
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    ref = logical()
    parts = [ref[f"model.{p}.weight"].chunk(2)[rank] for p in ("wq", "wk", "wv")]
    padded = torch.cat([ref["model.embed.weight"], torch.zeros(PADDED - VOCAB, DIM)])
    local_qkv, local_embed = torch.cat(parts), padded.chunk(2)[rank].clone()
    experts = ref["model.experts"].clone()
    if fill is not None:
        local_qkv, local_embed, experts = (
            t.clone().fill_(fill) for t in (local_qkv, local_embed, experts)
        )
    qkv = DTensor.from_local(local_qkv, mesh, [Shard(0)], shape=(Q + K + V, IN), stride=(IN, 1))
    embed = DTensor.from_local(local_embed, mesh, [Shard(0)], shape=(PADDED, DIM), stride=(DIM, 1))
    return {"model.wqkv.weight": qkv, "model.embed.weight": embed, "model.experts": experts}


def tp_rank(tmp: Path) -> None:
    CheckpointManager(tmp / "tp", layouts=LAYOUTS).save(1, tp_tensors())
    # vice versa: the plain checkpoint (saved by the test process) into the TP form
    loaded = tp_tensors(fill=7.0)
    assert CheckpointManager(tmp / "plain", layouts=LAYOUTS).load_latest(loaded).step == 1
    expected = tp_tensors()
    for name, value in expected.items():
        got = loaded[name].to_local() if isinstance(value, DTensor) else loaded[name]
        want = value.to_local() if isinstance(value, DTensor) else value
        assert torch.equal(got, want), name  # includes the zero-filled padding row


def test_fused_padded_tp2_to_plain_and_back(tmp_path):
    plain_layouts = (Stacked("experts", 3),)
    CheckpointManager(tmp_path / "plain", layouts=plain_layouts).save(1, logical())
    run_distributed(tp_rank, 2, args=(tmp_path,))

    checkpoint = tmp_path / "tp" / "step-00000001"
    for shard in sorted(checkpoint.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            assert all(f.get_tensor(key).numel() > 0 for key in f.keys())
    loaded = {name: torch.full_like(t, 7.0) for name, t in logical().items()}
    CheckpointManager(tmp_path / "tp", layouts=plain_layouts).load_latest(loaded)
    for name, value in logical().items():
        assert torch.equal(loaded[name], value), name


def test_plain_fused_tensor_round_trip(tmp_path):
    ref = logical()
    fused = torch.cat([ref["model.wq.weight"], ref["model.wk.weight"], ref["model.wv.weight"]])
    CheckpointManager(tmp_path, layouts=(FUSED,)).save(3, {"model.wqkv.weight": fused})
    names = ("model.wq.weight", "model.wk.weight", "model.wv.weight")
    unfused = {name: torch.zeros_like(ref[name]) for name in names}
    CheckpointManager(tmp_path).load_latest(unfused)
    for name, value in unfused.items():
        assert torch.equal(value, ref[name]), name


def test_layout_and_shape_mismatches_name_the_tensor(tmp_path):
    CheckpointManager(tmp_path, layouts=(Stacked("experts", 3),)).save(1, logical())
    undeclared = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="model.experts.*stacked"):
        undeclared.load_latest({"model.experts": torch.zeros(3, 4, 2)})
    with pytest.raises(ValueError, match="model.embed.weight.*shape"):
        undeclared.load_latest({"model.embed.weight": torch.zeros(VOCAB - 1, DIM)})
    with pytest.raises(ValueError, match="model.missing"):
        undeclared.load_latest({"model.missing": torch.zeros(1)})
    wrong_padding = CheckpointManager(tmp_path, layouts=(Padded("embed.weight", VOCAB - 1),))
    with pytest.raises(ValueError, match="model.embed.weight"):
        wrong_padding.load_latest({"model.embed.weight": torch.zeros(PADDED, DIM)})


def test_weights_only_selection(tmp_path):
    state = logical() | {"optimizer.state.wq.weight.exp_avg": torch.ones(Q, IN)}
    CheckpointManager(tmp_path, layouts=(Stacked("experts", 3),)).save(5, state)
    wanted = {"model.wq.weight": torch.zeros(Q, IN)}
    result = CheckpointManager(tmp_path).load(tmp_path, wanted)
    assert result.step == 5 and torch.equal(wanted["model.wq.weight"], state["model.wq.weight"])
