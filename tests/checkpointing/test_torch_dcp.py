"""Torch DCP interop (checkpointing/torch_dcp.py): a torchtitan-style DCP checkpoint, written by
two FSDP2 ranks with torch's own `dcp.save`, imports as ours and warm-starts `perennial train`;
our checkpoints load with torch's own `dcp.load`, plain or resharded as DTensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from checkpointing import CheckpointManager
from checkpointing.torch_dcp import PerennialReader, is_dcp_dir
from launch.cli import main as perennial_main
from tests.distributed import run_distributed
from tests.trainer.runs import perennial, tiny_job
from trainer.model import Llama, ModelConfig

# tiny_job's model (the byte tokenizer's 258 tokens), so `perennial train` can warm-start it.
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258)
STEP = 7


def save_like_torchtitan(out: str) -> dict[str, torch.Tensor]:
    """torchtitan's CheckpointManager.save on 2 FSDP2 ranks: {model, optimizer, train_state},
    the optimizer flattened, the persistent freqs_cis buffer in the model's state dict."""
    torch.manual_seed(0)
    model = Llama(CFG)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, CFG.vocab_size, (2, 8))).float().mean().backward()
    optimizer.step()
    model_sd = get_model_state_dict(model)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    states = {
        "model": {**model_sd, "freqs_cis": torch.zeros(16, 8)},
        "optimizer": get_optimizer_state_dict(model, optimizer, options=flat),
        "train_state": {"step": torch.tensor(STEP, dtype=torch.int32)},
    }
    dcp.save(states, checkpoint_id=str(Path(out) / f"step-{STEP}"))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full)


@pytest.fixture(scope="module")
def torchtitan_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("torchtitan") / "checkpoint"
    weights = run_distributed(save_like_torchtitan, world_size=2, args=(str(folder),))[0]
    assert sorted(p.name for p in (folder / f"step-{STEP}").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # fmt: skip
    return folder, weights


@pytest.fixture(scope="module")
def imported(torchtitan_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "root"
    assert perennial_main(["ckpt", "import", str(torchtitan_ckpt[0]), str(out)]) == 0
    return out


def test_ckpt_import_takes_the_weights_and_step_of_a_torchtitan_checkpoint(
    torchtitan_ckpt, imported
):
    _, weights = torchtitan_ckpt
    tensors = {f"model.{k}": torch.empty_like(v) for k, v in weights.items()}
    result = CheckpointManager(imported).load_latest(tensors)
    assert result.step == STEP and result.global_state["source"]["format"] == "torch-dcp"
    for name, value in weights.items():
        torch.testing.assert_close(tensors[f"model.{name}"], value, atol=0, rtol=0)


def test_plain_dcp_load_reads_our_checkpoint(torchtitan_ckpt, imported):
    _, weights = torchtitan_ckpt
    model = Llama(CFG)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=PerennialReader(imported), no_dist=True)
    for name, value in weights.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0)


def load_sharded(root: str, name: str) -> torch.Tensor:
    """One weight as a Shard(0) DTensor over the ranks, read by plain dcp.load."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    target = distribute_tensor(torch.zeros(CFG.vocab_size, CFG.dim), mesh, [Shard(0)])
    dcp.load({name: target}, storage_reader=PerennialReader(root))
    return target.full_tensor()


def test_plain_dcp_load_reshards_our_checkpoint_as_dtensors(torchtitan_ckpt, imported):
    _, weights = torchtitan_ckpt
    got = run_distributed(load_sharded, world_size=2,
                          args=(str(imported), "model.tok_embeddings.weight"))  # fmt: skip
    for full in got:
        torch.testing.assert_close(full, weights["tok_embeddings.weight"], atol=0, rtol=0)


def test_plain_dcp_load_of_a_damaged_checkpoint_raises(tmp_path):
    damaged = tmp_path / "damaged"
    CheckpointManager(damaged).save(1, {"model.w": torch.arange(64.0)}, {})
    shard = next((damaged / "step-00000001").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointException, match="checksum mismatch in block 0 of tensor"):
        dcp.load({"model.w": torch.zeros(64)}, storage_reader=PerennialReader(damaged),
                 no_dist=True)  # fmt: skip


def test_import_refuses_what_is_not_dcp(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert not is_dcp_dir(tmp_path / "empty")
    assert perennial_main(["ckpt", "import", str(tmp_path / "empty"), str(tmp_path / "o")]) != 0


@pytest.mark.slow
def test_train_init_from_a_torchtitan_checkpoint_starts_from_its_weights(
    torchtitan_ckpt, tmp_path
):
    folder, weights = torchtitan_ckpt
    run = tmp_path / "run"
    # lr 1e-9: the one step moves no weight by more than ~1e-9, so the export shows what
    # init.from gave (a fresh init differs by ~0.02)
    proc = perennial("train", *tiny_job(run, tmp_path / "cache", "train.max_steps=1",
                                        "schedule.warmup_steps=0", "optim.lr=1e-9",
                                        "schedule.min_lr=0", f"init.from={folder}"),
                     "--nproc", "2")  # fmt: skip
    assert f"warm start: weights from torch DCP checkpoint {folder / f'step-{STEP}'}" in (
        proc.stdout + proc.stderr)
    perennial("ckpt", "export", str(run), str(tmp_path / "w.safetensors"),
              "--format", "safetensors")  # fmt: skip
    exported = load_file(tmp_path / "w.safetensors")
    for name, value in weights.items():
        key = name if name in exported else f"model.{name}"
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=0)
