"""A live ZeRO engine's checkpoint (checkpointing/deepspeed/live.py) holds exactly DeepSpeed's own
full fp32 weights and Adam moments (safe_get_full_*), and loads into FSDP2 on 3 ranks with
those values, exactly."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from checkpointing import (
    CheckpointManager,
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
)
from tests.checkpointing.deepspeed_engines import Tiny, adamw
from tests.distributed import run_distributed

FULL = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)


def load_on_fsdp(root: str) -> None:
    """Rank body: FSDP2 model + AdamW loaded from our checkpoint, gathered back to full and
    written by rank 0 to fsdp.safetensors."""
    model = Tiny()
    for module in (model.embed, model.proj, model):
        fully_shard(module)
    optimizer = adamw(model)
    tensors = model_tensors(model)
    optim, _ = optimizer_tensors(model, optimizer)
    tensors.update(optim)
    result = CheckpointManager(f"{root}/ours").load_latest(tensors)
    apply_model_tensors(model, tensors)
    apply_optimizer_tensors(model, optimizer, tensors, result.global_state["optimizer"])
    full = {f"model.{k}": v for k, v in get_model_state_dict(model, options=FULL).items()}
    for key, value in get_optimizer_state_dict(model, optimizer, options=FULL).items():
        if key.startswith("state.") and not key.endswith(".step"):
            full[f"optimizer.{key}"] = value
    if torch.distributed.get_rank() == 0:
        save_file({k: v.detach().contiguous() for k, v in full.items()}, f"{root}/fsdp.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_live_zero_checkpoint_is_deepspeeds_state_and_loads_on_fsdp3(tmp_path, deepspeed_sources,
                                                                     stage):
    shutil.copytree(deepspeed_sources / f"live{stage}", tmp_path, dirs_exist_ok=True)
    theirs = load_file(tmp_path / "deepspeed.safetensors")
    run_distributed(load_on_fsdp, 3, args=(str(tmp_path),))
    loaded = load_file(tmp_path / "fsdp.safetensors")
    assert loaded.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(loaded[key], value.view(loaded[key].shape)), key
