"""Load, override, resolve and validate a `JobConfig`; write it back as YAML."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer.config import JobConfig
from trainer.init_from import adopt_init_model
from trainer.parallel.checks import (
    check_expert_parallel,
    check_expert_parallel_layout,
    check_pipeline_layout,
    check_pipeline_parallel,
    data_parallel_size,
)

# Config keys that are Python keywords live under another attribute name.
_KEYWORD_KEYS = {"init.from": "init.from_"}
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


ENV_CONFIG_NOTED = "PERENNIAL_CONFIG_NOTED"
"""Set by the launcher once it has printed the config's warnings; its workers stay quiet."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> JobConfig:
    """The default job, then the YAML file at `path`, then `key=value` overrides, resolved
    and validated (world-size checks come later, in `validate_layout`). Values adjusted to
    fit (a warmup longer than a short run) are reported once, as warnings on stderr."""
    merged = OmegaConf.structured(JobConfig)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(Path(path)))
        for key, value in _parse_overrides(overrides):
            # update, not merge: `data.sources.1.weight=0.5` must index into the list.
            OmegaConf.update(merged, key, value, merge=True)
        cfg: JobConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_describe(err)) from None
    notes = resolve_defaults(cfg)
    validate(cfg)
    adopted = adopt_init_model(cfg)  # after validate: init.from exists
    if adopted:
        validate(cfg)  # the adopted model against the rest (seq_len, tp)
    notes += adopted
    if not os.environ.get(ENV_CONFIG_NOTED) and os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    return cfg


def _load_yaml(path: Path):
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - any YAML problem is the user's file
        raise ValueError(f"config file {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return OmegaConf.create(_rename_keyword_keys(raw))


def _rename_keyword_keys(raw: dict) -> dict:
    for public, internal in _KEYWORD_KEYS.items():
        section, key = public.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][internal.split(".")[1]] = raw[section].pop(key)
    return raw


def _parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        # omegaconf's own value grammar, as in `key=[1,2]` or `key={a: 1}`
        parsed.append((_KEYWORD_KEYS.get(key, key), OmegaConf.from_dotlist([f"v={value}"])["v"]))
    return parsed


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    for public, internal in _KEYWORD_KEYS.items():
        key = key.replace(internal, public)
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        from trainer.config_doc import closest_key

        guess = closest_key(key)
        hint = f"; did you mean {guess}?" if guess else "; `perennial config` lists every key"
        return f"unknown config key {key!r}{hint}"
    message = str(err).splitlines()[0]
    return f"config key {key!r}: {message}" if key else f"config: {message}"


def resolve_defaults(cfg: JobConfig) -> list[str]:
    """Fill values that default to other values; fit the schedule's phases to its length.
    Returns what was adjusted, one line each."""
    if cfg.schedule.total_steps is None:
        cfg.schedule.total_steps = cfg.train.max_steps
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / "checkpoints")
    if not cfg.run.name:
        cfg.run.name = Path(cfg.run.dir).name
    return cfg.schedule.fit_to_length()


def validate(cfg: JobConfig) -> None:
    """Checks that need no world size. Raises ValueError naming the key."""
    cfg.model.validate()
    cfg.data.validate()
    cfg.schedule.validate(cfg.optim.lr)
    train = cfg.train
    for key in ("max_steps", "global_batch_size", "log_interval"):
        if getattr(train, key) <= 0:
            raise ValueError(f"train.{key} must be > 0, got {getattr(train, key)}")
    if train.micro_batch_size < 0:
        raise ValueError(f"train.micro_batch_size must be >= 0 (0 = auto), got "
                         f"{train.micro_batch_size}")
    if train.mixed_precision not in ("auto", "bf16", "fp32"):
        raise ValueError(
            f"train.mixed_precision must be auto, bf16 or fp32, got {train.mixed_precision!r}"
        )
    if train.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {train.device!r}")
    if cfg.optim.name != "adamw":
        raise ValueError(f"optim.name: unknown optimizer {cfg.optim.name!r}; available: adamw")
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.parallel.strategy not in ("fsdp", "ddp", "deepspeed"):
        raise ValueError(
            f"parallel.strategy must be fsdp, ddp or deepspeed, got {cfg.parallel.strategy!r}"
        )
    _validate_deepspeed(cfg)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})"
        )
    if cfg.checkpoint.persist_interval <= 0 or cfg.checkpoint.keep <= 0:
        raise ValueError("checkpoint.persist_interval and checkpoint.keep must be > 0")
    if not 0 <= cfg.checkpoint.save_budget < 1:
        budget = cfg.checkpoint.save_budget
        raise ValueError(f"checkpoint.save_budget must be in [0, 1), got {budget}")
    if cfg.init.from_ and not Path(cfg.init.from_).expanduser().exists():
        raise ValueError(f"init.from: {cfg.init.from_} does not exist")
    _validate_tp(cfg)
    check_expert_parallel(cfg)
    check_pipeline_parallel(cfg)


def _validate_tp(cfg: JobConfig) -> None:
    tp = cfg.parallel.tp
    if tp < 1:
        raise ValueError(f"parallel.tp must be >= 1, got {tp}")
    if tp == 1:
        return
    for key in ("n_heads", "n_kv_heads"):
        if getattr(cfg.model, key) % tp:
            raise ValueError(
                f"model.{key} ({getattr(cfg.model, key)}) is not divisible by parallel.tp ({tp})"
            )
    if cfg.parallel.strategy == "ddp":
        raise ValueError("parallel.tp > 1 needs parallel.strategy=fsdp (DDP is data-parallel only)")
    if cfg.model.tie_embeddings:
        raise ValueError("model.tie_embeddings is not supported with parallel.tp > 1")


def _validate_deepspeed(cfg: JobConfig) -> None:
    p = cfg.parallel
    if p.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}")
    if p.ds_config and p.strategy != "deepspeed":
        raise ValueError("parallel.ds_config needs parallel.strategy=deepspeed")
    if p.strategy != "deepspeed":
        return
    if p.tp > 1:
        raise ValueError("parallel.strategy=deepspeed supports parallel.tp=1 only")
    if cfg.checkpoint.interval > 0:
        raise ValueError("checkpoint.interval (memory snapshots) is not supported with "
                         "parallel.strategy=deepspeed; use checkpoint.persist_interval")
    if p.ds_config:
        from trainer.parallel.deepspeed_backend import load_user_ds_config

        load_user_ds_config(p.ds_config)


def validate_layout(cfg: JobConfig, world_size: int) -> None:
    """Checks that depend on the number of processes."""
    tp = cfg.parallel.tp
    if world_size % tp:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp ({tp})")
    check_pipeline_layout(cfg, world_size)
    check_expert_parallel_layout(cfg, world_size)
    dp, train = data_parallel_size(cfg, world_size), cfg.train
    if train.micro_batch_size and train.global_batch_size % (dp * train.micro_batch_size):
        raise ValueError(
            f"train.global_batch_size ({train.global_batch_size}) is not divisible by "
            f"data-parallel size ({dp}) × train.micro_batch_size ({train.micro_batch_size})"
        )
    if train.global_batch_size % dp:
        raise ValueError(f"train.global_batch_size ({train.global_batch_size}) is not divisible "
                         f"by data-parallel size ({dp})")
    if cfg.parallel.strategy == "deepspeed":
        from trainer.parallel.deepspeed_backend import check_ds_config

        check_ds_config(cfg, world_size)


def to_yaml(cfg: JobConfig) -> str:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    for public, internal in _KEYWORD_KEYS.items():
        section, key = internal.split(".")
        container[section] = {
            (public.split(".")[1] if k == key else k): v for k, v in container[section].items()
        }
    return OmegaConf.to_yaml(OmegaConf.create(container))


CONFIG_HISTORY = "config-history"


def save_config(cfg: JobConfig, run_dir: str | os.PathLike, step: int = 0) -> Path:
    """`<run_dir>/config.yaml`, and a copy per start of the run in `config-history/`
    (`<UTC time, µs>-step<N>.yaml`, N = the step it started from)."""
    text = to_yaml(cfg)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 10**6:06d}Z"
    history = Path(run_dir) / CONFIG_HISTORY / f"{stamp}-step{step}.yaml"
    for path in (history, Path(run_dir) / "config.yaml"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return Path(run_dir) / "config.yaml"


def save_config_or_warn(cfg: JobConfig, run_dir: str | os.PathLike, step: int = 0) -> bool:
    """save_config, or a warning when the disk refuses (full): training needs no config.yaml
    to go on, every checkpoint holds the config too. Returns whether it was written."""
    try:
        save_config(cfg, run_dir, step)
        return True
    except OSError as err:
        print(f"warning: cannot write {Path(run_dir) / 'config.yaml'} ({err.strerror or err}); "
              "training goes on and writes it when the disk has room", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            (Path(run_dir) / "config.yaml.tmp").unlink()
        return False
