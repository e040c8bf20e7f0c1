"""Torch DCP interop, both ways, so torchtitan users can move in and out.

In: a torch.distributed.checkpoint directory (`.metadata` + `__N_M.distcp` files), as torchtitan
writes it: a full save has the keys `model.<fqn>`, `optimizer.state.<fqn>.<name>`,
`train_state.step`, ...; its last-step `model_weights_only` save has bare `<fqn>` keys. Our
keys are torchtitan's (checkpointing/model_state.py), so a model loads without renaming. A
torchtitan checkpoint folder (`step-N/` directories) stands for its newest step.

    step = load_dcp_into(path, tensors)        # collective; DCP itself reshards to the layout
    import_dcp_checkpoint(path, out_root)       # `perennial ckpt import`: weights as ours

Out: any torch user reads our checkpoints with `torch.distributed.checkpoint.load`:

    dcp.load({"model": model.state_dict()}, storage_reader=PerennialReader("runs/a"))

The reader exposes every saved tensor under its key (`model.<fqn>`, `optimizer.state...`),
in any layout the caller asks for (plain tensors or DTensors), and checks the checksums of
what it reads. Optimizer hyperparameters (`optimizer.param_groups.*`) are JSON in our
`state.json`, not tensors: load the optimizer part with
`DefaultLoadPlanner(allow_partial_load=True)` and take them from there.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner

from checkpointing import collectives
from checkpointing.commit import resolve_checkpoint
from checkpointing.format import CheckpointDamaged, read_index
from checkpointing.manager import CheckpointManager
from checkpointing.model_state import MODEL_PREFIX
from checkpointing.storage import VerifyingShardReader

METADATA_FILE = ".metadata"
STEP_KEY = "train_state.step"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_dcp_dir(path: str | os.PathLike) -> bool:
    """A DCP checkpoint, or a folder of them (`step-N/.metadata`, torchtitan's layout)."""
    try:
        resolve_dcp(path)
    except ValueError:
        return False
    return True


def resolve_dcp(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    steps = [
        (int(m.group(1)), child)
        for child in (path.iterdir() if path.is_dir() else [])
        if (m := _STEP_DIR.match(child.name)) and (child / METADATA_FILE).is_file()
    ]
    if not steps:
        raise ValueError(f"{path} is not a torch DCP checkpoint (no {METADATA_FILE})")
    return max(steps)[1]


def dcp_model_keys(metadata: Metadata) -> dict[str, str]:
    """Our `model.<fqn>` key -> the DCP key holding that tensor."""
    tensors = {
        key for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
    }  # fmt: skip
    if any(key.startswith(MODEL_PREFIX) for key in tensors):  # a full torchtitan save
        return {key: key for key in tensors if key.startswith(MODEL_PREFIX)}
    # a model-only save: every tensor is a model tensor under its bare name
    return {MODEL_PREFIX + key: key for key in tensors}


def load_dcp_into(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], process_group=None
) -> int:
    """Collective: fill `tensors` (our `model.*` keys; plain tensors or DTensors) from the DCP
    checkpoint at `path`. Returns the step it records (torchtitan's train_state.step), else 0.
    Checkpoint tensors not asked for (optimizer, torchtitan's freqs_cis buffer) are skipped."""
    directory = resolve_dcp(path)
    reader = FileSystemReader(directory)
    metadata = reader.read_metadata()
    keys = dcp_model_keys(metadata)
    unwanted = sorted(set(tensors) - {k for k in tensors if k.startswith(MODEL_PREFIX)})
    if unwanted:
        raise ValueError(f"{directory}: only model weights load from a DCP checkpoint, "
                         f"not {unwanted[0]} (optimizer state starts fresh)")  # fmt: skip
    missing = sorted(set(tensors) - set(keys))
    if missing:
        raise ValueError(f"{directory}: DCP checkpoint has no tensor for {missing[0]} "
                         f"({len(missing)} missing; it has e.g. {sorted(keys)[:3]})")  # fmt: skip
    for ours, tensor in tensors.items():
        saved = metadata.state_dict_metadata[keys[ours]].size
        if tuple(saved) != tuple(tensor.shape):
            raise ValueError(f"{directory}: {keys[ours]} has shape {tuple(saved)}, the model's "
                             f"{ours} {tuple(tensor.shape)}; set model.* to the saved model")
    request = {keys[ours]: tensor for ours, tensor in tensors.items()}
    step = torch.zeros((), dtype=torch.int64)
    if STEP_KEY in metadata.state_dict_metadata:
        request[STEP_KEY] = step
    with warnings.catch_warnings():  # single-process use is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, storage_reader=reader, process_group=process_group,
                 planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=not collectives.is_distributed(process_group))  # fmt: skip
    return int(request.get(STEP_KEY, step))


def import_dcp_checkpoint(src: str | os.PathLike, out_root: str | os.PathLike) -> Path:
    """Write the model weights of the DCP checkpoint at `src` as one of our checkpoints under
    `out_root` (one process; peak memory is the whole model, as for the DeepSpeed import)."""
    directory = resolve_dcp(Path(src).expanduser().resolve())
    metadata = FileSystemReader(directory).read_metadata()
    keys = dcp_model_keys(metadata)
    tensors = {}
    for ours, key in keys.items():
        saved = metadata.state_dict_metadata[key]
        tensors[ours] = torch.empty(saved.size, dtype=saved.properties.dtype)
    step = load_dcp_into(directory, tensors)
    state = {
        "step": step,
        "tokens_seen": 0,
        "schedule_offset": 0,
        "phase": {},
        "optimizer": {},
        "source": {"format": "torch-dcp", "path": str(directory)},
    }
    return CheckpointManager(out_root, keep=1).save(step, tensors, state)


class PerennialReader(VerifyingShardReader):
    """A torch.distributed.checkpoint StorageReader for our checkpoints: pass a checkpoint dir,
    checkpoint root or run dir (its newest committed checkpoint). Damage (a missing file, a
    checksum mismatch) raises CheckpointDamaged from `dcp.load`."""

    def __init__(self, path: str | os.PathLike) -> None:
        directory = resolve_checkpoint(path)
        super().__init__(directory, read_index(directory))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        done = super().read_data(plan, planner)
        if self.damage:
            raise CheckpointDamaged(f"checkpoint {self.directory} is damaged: {self.damage}")
        return done
