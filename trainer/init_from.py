"""What `init.from` names, and the model it implies, settled when the config loads (so before
any process starts, and the same in the launcher and every worker).

`init.from` is a checkpoint, a checkpoint root or run directory (its newest committed
checkpoint), a torch DCP checkpoint (torchtitan), or a Hugging Face model directory
(config.json + weights). A Hugging Face
directory, or a checkpoint `perennial ckpt import` made from one, sets the run's `model.*` (and
`data.tokenizer`, when the directory has a tokenizer and the run uses the byte tokenizer); a
checkpoint written by growth sets the grown shape keys (trainer/growth/midrun.py).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from checkpointing import CheckpointDamaged, resolve_checkpoint
from checkpointing.format import STATE_FILE, read_json
from checkpointing.torch_dcp import is_dcp_dir, resolve_dcp
from trainer.config import JobConfig
from trainer.model.config import ModelConfig


def is_hf_source(path: str | Path) -> bool:
    from trainer.model.hf_io import is_hf_dir

    return is_hf_dir(path)


def check_init_from(source: str) -> Path | None:
    """The checkpoint `init.from` names (None: a Hugging Face directory); ValueError (one
    line) when it is none of the sources above."""
    path = Path(source).expanduser()
    if is_hf_source(path):
        return None
    if is_dcp_dir(path):  # torch DCP (torchtitan): weights only, the run's model.* stays
        return resolve_dcp(path)
    try:
        return resolve_checkpoint(path)
    except ValueError as err:
        raise ValueError(
            f"init.from: {source} is not a checkpoint, a run directory with a committed "
            f"checkpoint, a torch DCP checkpoint, or a Hugging Face model directory "
            f"(config.json + weights): {err}"
        ) from None


def adopt_init_model(cfg: JobConfig) -> list[str]:
    """Apply what `init.from` implies to `cfg`; one note per key changed. A source that is
    none of the above changes nothing here: the launcher's preflight (`check_init_from`) and
    the warm start refuse it, and a config may name a source that a job before it will write."""
    if not cfg.init.from_:
        return []
    try:
        checkpoint = check_init_from(cfg.init.from_)
    except ValueError:
        return []
    if checkpoint is not None and is_dcp_dir(checkpoint):
        return []
    if checkpoint is None:
        from trainer.model.hf_io import hf_model_overrides, tokenizer_of

        source = Path(cfg.init.from_).expanduser()
        return _adopt(cfg, hf_model_overrides(source), tokenizer_of(source), f"{source}")
    try:
        state = read_json(checkpoint / STATE_FILE)["global_state"]
    except (KeyError, CheckpointDamaged):
        return []  # the warm start reports what is wrong with it
    if (state.get("source") or {}).get("format") == "hf" and "config" in state:
        saved = yaml.safe_load(state["config"])
        tokenizer = (saved.get("data") or {}).get("tokenizer")
        return _adopt(cfg, saved["model"], tokenizer, f"{checkpoint} (imported)")
    from trainer.growth.midrun import adopt_grown_init

    return [f"model shape from grown init.from: {', '.join(changed)}"
            for changed in [adopt_grown_init(cfg)] if changed]


def _adopt(cfg: JobConfig, model: dict, tokenizer: str | None, where: str) -> list[str]:
    from trainer.model.hf import model_config_from_dict

    theirs = model_config_from_dict(model)
    changed = [f"model.{f.name}={getattr(theirs, f.name)}" for f in fields(ModelConfig)
               if getattr(cfg.model, f.name) != getattr(theirs, f.name)]
    cfg.model = theirs
    if tokenizer and cfg.data.tokenizer == "bytes":
        cfg.data.tokenizer = tokenizer
        changed.append(f"data.tokenizer={tokenizer}")
    if not changed:
        return []
    return [f"init.from={where} sets {', '.join(changed)}"]
