"""Read a local Hugging Face model directory and import it as a Perennial checkpoint.

Accepted weights: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
or `pytorch_model.bin` (also sharded with its index), the latter only through
`torch.load(weights_only=True)`, which unpickles nothing but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from checkpointing import CheckpointManager, model_tensors
from trainer.model.hf import (
    family_of_config,
    from_hf,
    hf_config_to_model_overrides,
    model_config_from_dict,
)
from trainer.model.llama import Llama

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_ENTRY_POINTS = (SAFETENSORS_INDEX, SAFETENSORS_FILE, BIN_INDEX, BIN_FILE)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
IMPORT_DTYPE = torch.float32
"""Imported weights are stored in fp32, the dtype of the trainer's master weights."""


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory holding an HF config.json and model weights (not a Perennial checkpoint)."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and any((path / n).is_file() for n in WEIGHT_ENTRY_POINTS)


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def hf_model_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """Our `model.*` values (bare keys: dim, n_layers, ...) described by `path`/config.json."""
    config_path = Path(path).expanduser() / CONFIG_FILE
    return hf_config_to_model_overrides(read_hf_config(path), source=str(config_path))


def hf_weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The weight files of an HF directory, all checked to exist."""
    hf_dir = Path(hf_dir).expanduser()
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (hf_dir / index_name).is_file():
            files = [hf_dir / name for name in _index_weight_map(hf_dir / index_name).values()]
            files = sorted(set(files))
            break
    else:
        files = [hf_dir / n for n in (SAFETENSORS_FILE, BIN_FILE) if (hf_dir / n).is_file()][:1]
        if not files:
            raise ValueError(f"{hf_dir} holds none of {', '.join(WEIGHT_ENTRY_POINTS)}")
    for file in files:
        if not file.is_file():
            raise ValueError(f"weight shard {file} is missing")
    return files


def _index_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a valid weight index: {err}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: weight_map is empty or not an object")
    return weight_map


def iter_hf_tensors(hf_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the directory's weights, one file at a time."""
    for file in hf_weight_files(hf_dir):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def import_hf_checkpoint(hf_dir: str | os.PathLike, out_root: str | os.PathLike) -> Path:
    """Write the HF model at `hf_dir` as checkpoint step 0 under `out_root`; returns its dir.

    Collective when a process group is initialised (call it on every rank with the same
    arguments; replicated tensors are written once). Holds the model once in memory, in fp32.
    """
    hf_dir = Path(hf_dir).expanduser().resolve()
    overrides = hf_model_overrides(hf_dir)
    tensors = _checked_model_tensors(hf_dir, overrides)
    from trainer.checkpointer import expert_layouts  # the trainer's layout declarations

    layouts = expert_layouts(model_config_from_dict(overrides))
    state = {
        "step": 0,
        "tokens_seen": 0,
        "schedule_offset": 0,
        "phase": {},
        "optimizer": {},
        "config": yaml.safe_dump({"model": overrides, "data": _data_section(hf_dir)}),
        "source": {"format": "hf", "path": str(hf_dir)},
    }
    return CheckpointManager(out_root, keep=1, layouts=layouts).save(0, tensors, state)


def _checked_model_tensors(hf_dir: Path, overrides: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.<fqn>` tensors exactly as `model_tensors(Llama(cfg))` names and shapes them."""
    cfg = model_config_from_dict(overrides)
    with torch.device("meta"):
        expected = model_tensors(Llama(cfg))
    hf_state = dict(iter_hf_tensors(hf_dir))
    try:
        ours = from_hf(hf_state, family_of_config(cfg), tie_embeddings=cfg.tie_embeddings)
    except ValueError as err:
        raise ValueError(f"{hf_dir}: {err}") from None
    tensors = {"model." + name: t.to(IMPORT_DTYPE) for name, t in ours.items()}
    for key in sorted(set(expected) | set(tensors)):
        name = key.removeprefix("model.")
        if key not in tensors:
            raise ValueError(f"{hf_dir}: the weights lack tensor for {name!r}")
        if key not in expected:
            raise ValueError(f"{hf_dir}: tensor {name!r} is not part of the model in config.json")
        if tensors[key].shape != expected[key].shape:
            raise ValueError(
                f"{hf_dir}: tensor {name!r} has shape {tuple(tensors[key].shape)}, config.json "
                f"implies {tuple(expected[key].shape)}"
            )
    if cfg.tie_embeddings:  # one tensor under both names, as in the tied model
        tensors["model.output.weight"] = tensors["model.tok_embeddings.weight"]
    return tensors


def tokenizer_of(hf_dir: str | os.PathLike) -> str | None:
    """The HF dir itself when it holds tokenizer files (a `data.tokenizer` value)."""
    hf_dir = Path(hf_dir).expanduser().resolve()
    return str(hf_dir) if any((hf_dir / n).is_file() for n in TOKENIZER_MARKERS) else None


def _data_section(hf_dir: Path) -> dict[str, str]:
    """`data.tokenizer` = the HF dir when it holds tokenizer files, so export copies them."""
    tokenizer = tokenizer_of(hf_dir)
    return {"tokenizer": tokenizer} if tokenizer else {}
