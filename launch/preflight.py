"""Checks for the usual launch mistakes, run before any worker starts. Each raises a one-line
ValueError that names the problem and what to change.

`perennial slurm` runs them at submission time; `perennial train` runs `preflight(...)` before
it starts the keepers and torchrun. The `/dev/shm` check estimates the memory tier's size from
the model config (fp32 weights + two AdamW moments, SLOTS_PER_RANK slots per rank); the keeper
checks the exact size again when the workers register their slots.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from checkpointing import resolve_checkpoint
from checkpointing.format import STATE_FILE, read_json
from checkpointing.snapshot.slots import SLOTS_PER_RANK
from launch.keepers import shm_root_for
from trainer.config_loader import validate_layout
from trainer.data.reading import resolve_raw_source
from trainer.data.shards import is_prepared_dir
from trainer.init_from import check_init_from
from trainer.parallel.checks import data_parallel_size

SHM_DIR = Path("/dev/shm")
GIB = 2**30
BYTES_PER_PARAM = 3 * 4  # fp32 weight, exp_avg, exp_avg_sq


def preflight(cfg, nproc: int, nnodes: int, rdzv_endpoint: str = "",
              shm_dir: Path | None = None) -> None:
    check_world_size(cfg, nproc, nnodes)
    check_run_dir_writable(cfg.run.dir)
    if cfg.init.from_:
        check_init_from(cfg.init.from_)
    check_data_files(cfg.data)
    check_resume_model(cfg)
    if rdzv_endpoint:
        check_rendezvous_port(rdzv_endpoint)
    if cfg.checkpoint.memory_snapshots():
        check_shm_space(cfg, nproc, nproc * nnodes, shm_dir)
    check_data(cfg, nproc * nnodes)


def check_data(cfg, world_size: int) -> None:
    """Open every data source as the workers will, preparing raw ones into data.cache_dir
    first: an empty source, a missing column, an unreadable file, a tokenizer too large for
    model.vocab_size or one that differs from a prepared source's fails here, on one line."""
    from trainer.data import build_data

    t = cfg.train
    micro = t.micro_batch_for(data_parallel_size(cfg, world_size))
    build_data(cfg.data, t.seed, t.global_batch_size, micro, cfg.model.vocab_size)


def check_world_size(cfg, nproc: int, nnodes: int) -> None:
    """--nproc × --nnodes must fit parallel.tp and the batch sizes."""
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc ({nproc}) and the node count ({nnodes}) must be >= 1")
    world = nproc * nnodes
    try:
        validate_layout(cfg, world)
    except ValueError as err:
        raise ValueError(
            f"{nproc} process(es) per node × {nnodes} node(s) = world size {world} does not "
            f"fit the config: {err}"
        ) from None


def check_run_dir_writable(run_dir: str | os.PathLike) -> None:
    """Create run.dir (the trainer would) and prove a file can be written there."""
    path = Path(run_dir).expanduser()
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"run.dir {run_dir} is not writable ({reason}); choose another run.dir or fix "
            f"its permissions"
        ) from None


def check_data_files(data_cfg) -> None:
    """Every local data file is non-empty, and the first record of a JSON Lines or Parquet
    file holds the source's text column (what the workers would fail on, one by one)."""
    for i, source in enumerate(data_cfg.sources):
        if source.path.startswith("stdlib:") or is_prepared_dir(os.path.expanduser(source.path)):
            continue  # built-in corpora and prepared shards are checked when they are opened
        key = f"data.sources[{i}]"
        raw = resolve_raw_source(source.path)
        if raw.kind != "files":
            continue
        files = list(raw.files)
        for file in files:
            if os.path.getsize(file) == 0:
                raise ValueError(f"{key}.path: {file} is empty")
        columns = first_record_columns(files[0])
        if columns is not None and source.text_column not in columns:
            raise ValueError(
                f"{key}: no column {source.text_column!r} in {files[0]} (columns: "
                f"{sorted(columns)}); set {key}.text_column"
            )


def first_record_columns(file: str) -> list[str] | None:
    """Column names of a .jsonl/.parquet file's first record; None for other formats."""
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_schema(file).names
    if not file.endswith(".jsonl"):
        return None  # .txt has no columns; a .json file may be one array or JSON Lines
    with open(file, encoding="utf-8", errors="replace") as fh:
        line = next((line for line in fh if line.strip()), None)
    if line is None:
        raise ValueError(f"{file} holds no records (only blank lines)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: the first record is not JSON ({err})") from None
    return list(record) if isinstance(record, dict) else []


def check_resume_model(cfg) -> None:
    """A run that resumes must describe the model its newest checkpoint holds."""
    if not cfg.checkpoint.enabled or cfg.grow.at_step:  # growth changes the model mid-run
        return
    try:
        checkpoint = resolve_checkpoint(cfg.checkpoint.dir)
        state = read_json(checkpoint / STATE_FILE)["global_state"]
        saved = yaml.safe_load(state["config"])["model"]
    except (ValueError, KeyError, TypeError):
        return  # nothing to resume, or the restore reports what is wrong with it
    ours = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    diffs = [f"model.{key} is {theirs!r} there, {mine!r} now"
             for key, theirs, mine in _differences(saved, ours)
             if not (key == "vocab_size" and mine == 0)]  # 0: set from the tokenizer later
    if diffs:
        raise ValueError(
            f"run.dir {cfg.run.dir} resumes {checkpoint} (step {state.get('step')}), whose model "
            f"differs: {'; '.join(diffs)}. Drop those model.* changes to resume, or start a new "
            f"run.dir with init.from={cfg.run.dir}"
        )


def _differences(saved: dict, ours: dict, prefix: str = ""):
    for key, mine in ours.items():
        theirs = saved.get(key, mine)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            yield from _differences(theirs, mine, f"{prefix}{key}.")
        elif theirs != mine:
            yield f"{prefix}{key}", theirs, mine


def check_rendezvous_port(endpoint: str) -> None:
    """The c10d store listens on the endpoint's port on the host that owns its address; on that
    host the port must be free. Other hosts cannot tell and skip the check."""
    host, port = split_endpoint(endpoint)
    try:
        address = socket.gethostbyname(host)
    except OSError:
        raise ValueError(f"rendezvous host {host!r} (from {endpoint}) does not resolve") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the c10d store binds: a port held only by TIME_WAIT leftovers (a requeued job on
        # the same node) is free; one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"rendezvous port {port} on {host} is already in use (another job or "
                    f"torchrun?); choose a free port in --rdzv-endpoint {host}:PORT"
                ) from None
            if err.errno not in (errno.EADDRNOTAVAIL, errno.EACCES):
                raise


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def check_shm_space(cfg, nproc: int, world_size: int, shm_dir: Path | None = None) -> None:
    """This node's snapshot slots (and its peer's replica) must fit in shared memory
    (`shm_dir`: the keeper's --shm-dir, default /dev/shm)."""
    need = snapshot_bytes_per_node(cfg, nproc, world_size)
    held = _bytes_under(shm_root_for(cfg.run.dir, None, shm_dir))
    shm_dir = shm_dir or SHM_DIR
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize + held
    if need > free:
        raise ValueError(
            f"{shm_dir} has {format_bytes(free)} free but checkpoint.interval="
            f"{cfg.checkpoint.interval} needs at least {format_bytes(need)} for the memory "
            f"snapshots of {nproc} local rank(s); enlarge {shm_dir} (docker: --shm-size) or set "
            f"checkpoint.interval=0"
        )


def format_bytes(count: int) -> str:
    """GiB, MiB or KiB with three significant digits: never "0.00 GiB" for a small size."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def snapshot_bytes_per_node(cfg, nproc: int, world_size: int) -> int:
    """A lower bound: fp32 weights and AdamW moments, sharded as the layout shards them."""
    params = count_params(cfg.model)
    shards = world_size if cfg.parallel.strategy == "fsdp" else cfg.parallel.tp
    per_rank = params * BYTES_PER_PARAM // max(shards, 1)
    copies = SLOTS_PER_RANK * (2 if cfg.checkpoint.replicas else 1)
    return per_rank * nproc * copies


def count_params(model_cfg) -> int:
    """Parameters of the configured model, built on the meta device (no memory, no init)."""
    import dataclasses

    import torch

    from trainer.model import Llama

    if not model_cfg.vocab_size:  # set from the tokenizer later; bytes at least
        model_cfg = dataclasses.replace(model_cfg, vocab_size=256)
    with torch.device("meta"):
        return Llama(model_cfg).num_params()


def _bytes_under(root: Path) -> int:
    """Shared memory this run's keepers already hold: reused (or replaced) by the next run."""
    total = 0
    for path in root.rglob("*") if root.is_dir() else []:
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # a keeper dropped it meanwhile
            pass
    return total
