"""Export a Perennial checkpoint as a Hugging Face model directory, one tensor at a time.

Each tensor's saved boxes are read (checksum-verified) and assembled by the checkpointing
reader; memory holds at most one output shard. Shards are planned from the index's sizes
before anything is read, so they get their final `model-0000i-of-0000n.safetensors` names.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from transformers import GenerationConfig
from transformers.utils.hub import convert_file_size_to_int

from checkpointing import resolve_checkpoint
from checkpointing.format import STATE_FILE, read_index, read_json
from checkpointing.model_state import MODEL_PREFIX
from checkpointing.reading import ShardFiles
from trainer.data.tokenizer import ByteTokenizer
from trainer.model.hf import family_of_config, model_config_from_dict, model_config_to_hf
from trainer.model.hf_io import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, read_hf_config
from trainer.model.llama import Llama

DEFAULT_MAX_SHARD_SIZE = "5GB"
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt"
    r"|chat_template.*|.*\.tiktoken|spiece\.model|sentencepiece.*\.model)$"
)


@dataclass
class ExportReport:
    out: Path
    checkpoint: Path
    weight_files: list[str]
    tokenizer_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_hf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype = torch.float32,
) -> ExportReport:
    """Write checkpoint `path` (a checkpoint dir, checkpoint root or run dir) as an HF model
    directory at `out` (which must not exist or be empty)."""
    checkpoint = resolve_checkpoint(path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory")
    job = _saved_job_config(checkpoint)
    model_cfg = model_config_from_dict(job["model"])
    tokenizer = (job.get("data") or {}).get("tokenizer", "bytes")
    bos, eos = _special_ids(tokenizer)
    hf_config = model_config_to_hf(job["model"], dtype, bos_token_id=bos, eos_token_id=eos)
    names = _hf_names_in_order(checkpoint, model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out=out, checkpoint=checkpoint, weight_files=[])
    report.weight_files = _write_weights(checkpoint, out, names, dtype, _size(max_shard_size))
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    config_obj = family_of_config(model_cfg).config_class.from_dict(hf_config)
    GenerationConfig.from_model_config(config_obj).save_pretrained(out)
    _export_tokenizer(tokenizer, out, report)
    if model_cfg.moe.enabled() and model_cfg.moe.capacity_factor:
        report.notes.append(
            f"model.moe.capacity_factor={model_cfg.moe.capacity_factor} dropped tokens in "
            "training; MixtralForCausalLM routes every token (dropless)"
        )
    return report


def _saved_job_config(checkpoint: Path) -> dict[str, Any]:
    state = read_json(checkpoint / STATE_FILE)
    text = state.get("global_state", {}).get("config")
    job = yaml.safe_load(text) if isinstance(text, str) else None
    if not isinstance(job, dict) or not isinstance(job.get("model"), dict):
        raise ValueError(
            f"{checkpoint / STATE_FILE}: global_state.config holds no `model:` section, "
            "so the model cannot be described for Hugging Face"
        )
    return job


ExportName = tuple[str, str, int | None]
"""(checkpoint tensor name, HF name, row of the checkpoint tensor or None for all of it)."""


def _hf_names_in_order(checkpoint: Path, model_cfg) -> list[ExportName]:
    """Every exported tensor in our parameter order (a stacked expert tensor's rows together,
    so each is read once); checks names and shapes first."""
    index = read_index(checkpoint)
    with torch.device("meta"):
        expected = Llama(model_cfg).state_dict()
    to_hf_names = family_of_config(model_cfg).to_hf_names
    names = []
    for name, tensor in expected.items():
        saved = index.tensors.get(MODEL_PREFIX + name)
        if saved is None:
            raise ValueError(f"checkpoint {checkpoint} lacks tensor {MODEL_PREFIX + name!r}")
        if saved.shape != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint {checkpoint}: tensor {MODEL_PREFIX + name!r} has shape "
                f"{saved.shape}, its model config implies {tuple(tensor.shape)}"
            )
        if model_cfg.tie_embeddings and name == "output.weight":
            continue  # HF ties lm_head to embed_tokens and does not save it
        rows = tensor.shape[0] if tensor.dim() else 0
        names += [(MODEL_PREFIX + name, hf, row) for hf, row in to_hf_names(name, rows)]
    return names


def _plan_shards(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow this one."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_shard_size:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def _write_weights(
    checkpoint: Path, out: Path, names: list[ExportName], dtype: torch.dtype, max_size: int
) -> list[str]:
    index = read_index(checkpoint)
    sizes = [_numel(index.tensors[ours].shape, row) * dtype.itemsize for ours, _, row in names]
    shards = _plan_shards(sizes, max_size)
    assert sum(map(len, shards)) == len(names)
    files = (
        [SAFETENSORS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    with ShardFiles(checkpoint, index) as reader:
        read = _LastTensorReader(reader)
        for file, members in zip(files, shards):
            shard = {names[i][1]: read(names[i][0], names[i][2], dtype) for i in members}
            save_file(shard, out / file, metadata={"format": "pt"})
            _usual_permissions(out / file)
            weight_map.update(dict.fromkeys(shard, file))
            del shard
    if len(files) > 1:
        meta = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return files


def _usual_permissions(path: Path) -> None:
    """safetensors' writer creates files 0600; give them what any file here gets (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _numel(shape: tuple[int, ...], row: int | None) -> int:
    return math.prod(shape[1:] if row is not None else shape)


class _LastTensorReader:
    """Reads checkpoint tensors, keeping the last one so its expert rows are read once."""

    def __init__(self, reader: ShardFiles):
        self.reader = reader
        self.name: str | None = None
        self.tensor: torch.Tensor | None = None

    def __call__(self, name: str, row: int | None, dtype: torch.dtype) -> torch.Tensor:
        if name != self.name:
            self.name, self.tensor = name, self.reader.read_tensor(name)
        value = self.tensor if row is None else self.tensor[row]
        return value.to(dtype).contiguous()


def _size(max_shard_size: int | str) -> int:
    try:
        size = convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ValueError(f"--max-shard-size {max_shard_size!r} is not a size like 5GB") from None
    if size <= 0:
        raise ValueError(f"--max-shard-size must be > 0, got {max_shard_size!r}")
    return size


def _special_ids(tokenizer: str) -> tuple[int | None, int | None]:
    if tokenizer == "bytes":
        return ByteTokenizer.bos_id, ByteTokenizer.eos_id
    if (Path(tokenizer).expanduser() / CONFIG_FILE).is_file():  # an imported HF dir: keep its ids
        saved = read_hf_config(tokenizer)
        return saved.get("bos_token_id"), saved.get("eos_token_id")
    return None, None


def _export_tokenizer(tokenizer: str, out: Path, report: ExportReport) -> None:
    if tokenizer == "bytes":
        report.notes.append(
            "tokenizer: the run used Perennial's byte tokenizer (ids 0-255 = bytes, BOS 256, "
            "EOS 257), which has no Hugging Face files; none written"
        )
        return
    source = Path(tokenizer).expanduser()
    if not source.is_dir():
        raise ValueError(f"data.tokenizer {tokenizer} is not a directory; cannot copy it")
    for file in sorted(source.iterdir()):
        if file.is_file() and _TOKENIZER_FILE.match(file.name):
            shutil.copy2(file, out / file.name)
            report.tokenizer_files.append(file.name)
    if not report.tokenizer_files:
        report.notes.append(f"tokenizer: no tokenizer files found in {source}; none written")
