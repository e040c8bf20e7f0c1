"""Growth on universal checkpoints: read the source one tensor at a time, stream the target.

`CheckpointManager.save` takes every tensor at once, so the grown checkpoint is written here
with the format's own building blocks (safetensors header, per-block crc32, index.json,
state.json, the atomic commit): one shard file, world size 1, each target tensor computed from
its one source tensor, written, and dropped before the next. Peak memory is one source tensor
plus the targets built from it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from checkpointing import resolve_checkpoint
from checkpointing.commit import commit, committed_dirs, new_temp_dir_name, structural_problem
from checkpointing.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    STATE_FILE,
    CheckpointIndex,
    SavedBox,
    SavedTensor,
    block_checksums,
    read_index,
    read_json,
    safetensors_header,
    shard_file_name,
    tensor_bytes,
    write_json_durably,
)
from checkpointing.reading import ShardFiles
from trainer.growth.plan import Spec, Target, target_specs
from trainer.model.config import ModelConfig


class SourceCheckpoint:
    """A committed universal checkpoint opened for tensor-at-a-time reads."""

    def __init__(self, src: str | Path):
        self.path = resolve_checkpoint(src)
        problem = structural_problem(self.path)
        if problem:
            raise ValueError(f"checkpoint {self.path} is damaged: {problem}")
        self.index = read_index(self.path)
        self.state = read_json(self.path / STATE_FILE)
        self.global_state: dict[str, Any] = self.state["global_state"]
        if "config" not in self.global_state:
            raise ValueError(f"checkpoint {self.path} has no job config (global_state.config)")
        config = OmegaConf.create(self.global_state["config"])
        self.job_config: dict = OmegaConf.to_container(config)
        self.model_config = model_config_from_dict(self.job_config.get("model", {}), self.path)

    @property
    def specs(self) -> dict[str, Spec]:
        return {name: (t.shape, t.dtype) for name, t in self.index.tensors.items()}


def model_config_from_dict(section: dict, where: Path | str) -> ModelConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
        cfg: ModelConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"{where}: bad model config: {str(err).splitlines()[0]}") from None
    cfg.validate()
    return cfg


def config_yaml_with_model(job_config: dict, model: ModelConfig) -> str:
    job = dict(job_config)
    job["model"] = OmegaConf.to_container(OmegaConf.structured(model))
    return OmegaConf.to_yaml(OmegaConf.create(job))


def layout_record(name: str, shape: tuple[int, ...]) -> dict | None:
    """What `checkpointing.layout.to_logical` records for a declared Stacked expert tensor."""
    if ".feed_forward.experts." in name and shape:
        return {"kind": "stacked", "num_experts": shape[0]}
    return None


def write_grown_checkpoint(
    source: SourceCheckpoint, out: str | Path, targets: list[Target], global_state: dict
) -> Path:
    """Commit the targets as checkpoint `source.index.step` under the checkpoint root `out`."""
    root = Path(out)
    if committed_dirs(root):
        raise ValueError(f"OUT {root} already holds checkpoints; choose a new directory")
    specs = target_specs(targets, source.specs)
    step = source.index.step
    root.mkdir(parents=True, exist_ok=True)
    temp = root / new_temp_dir_name(step)
    temp.mkdir()
    try:
        with ShardFiles(source.path, source.index) as files:
            tensors, file_info = _write_shard(temp, targets, specs, files.read_tensor, source)
        index = CheckpointIndex(step, 1, source.index.block_size, file_info, tensors)
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": 1,
            "global_state": global_state,
            "rank_states": source.state.get("rank_states", []),
        }
        write_json_durably(temp / STATE_FILE, state)
        write_json_durably(temp / INDEX_FILE, index.to_json())
        return commit(root, temp, step)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _write_shard(
    directory: Path,
    targets: list[Target],
    specs: dict[str, Spec],
    read: Callable[[str], torch.Tensor],
    source: SourceCheckpoint,
) -> tuple[dict[str, SavedTensor], dict[str, dict[str, int]]]:
    file_name = shard_file_name(0)
    block_size = source.index.block_size
    entries = []
    for target in targets:
        shape, dtype = specs[target.name]
        key = f"{target.name}@{','.join('0' * len(shape))}"
        entries.append((key, dtype, list(shape), math.prod(shape) * dtype.itemsize))
    header = safetensors_header(entries)
    file_info = {"size": len(header) + sum(e[3] for e in entries)}
    file_info["header_crc32"] = block_checksums(header, len(header))[0]
    tensors, offset = {}, len(header)
    with open(directory / file_name, "wb") as f:
        f.write(header)
        for target, (_, dtype, shape, nbytes) in zip(targets, entries):
            value = target.build(*(read(s) for s in target.sources))
            assert tuple(value.shape) == tuple(shape) and value.dtype == dtype, target.name
            data = tensor_bytes(value)
            f.write(data)
            box = SavedBox(
                offsets=(0,) * len(shape),
                sizes=tuple(shape),
                file=file_name,
                byte_offset=offset,
                byte_length=nbytes,
                block_crc32=tuple(block_checksums(data, block_size)),
            )
            tensors[target.name] = SavedTensor(
                tuple(shape), dtype, (box,), layout_record(target.name, tuple(shape))
            )
            offset += nbytes
        f.flush()
        os.fsync(f.fileno())
    return tensors, {file_name: file_info}
