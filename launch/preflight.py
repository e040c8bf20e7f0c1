"""Checks for the usual launch mistakes, run before any worker starts. Each raises a one-line
ValueError that names the problem and what to change.

`perennial slurm` runs them at submission time; `perennial train` runs `preflight(...)` before
it starts the keepers and torchrun. The `/dev/shm` check estimates the memory tier's size from
the model config (fp32 weights + two AdamW moments, SLOTS_PER_RANK slots per rank); the keeper
checks the exact size again when the workers register their slots.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from checkpointing.snapshot.slots import SLOTS_PER_RANK
from launch.keepers import job_id
from trainer.config_loader import validate_layout

SHM_DIR = Path("/dev/shm")
GIB = 2**30
BYTES_PER_PARAM = 3 * 4  # fp32 weight, exp_avg, exp_avg_sq


def preflight(cfg, nproc: int, nnodes: int, rdzv_endpoint: str = "") -> None:
    check_world_size(cfg, nproc, nnodes)
    check_run_dir_writable(cfg.run.dir)
    if rdzv_endpoint:
        check_rendezvous_port(rdzv_endpoint)
    if cfg.checkpoint.memory_snapshots():
        check_shm_space(cfg, nproc, nproc * nnodes)
    check_data(cfg)


def check_data(cfg) -> None:
    """Open every data source as the workers will, preparing raw ones into data.cache_dir
    first: an empty source, a missing column, an unreadable file, a tokenizer too large for
    model.vocab_size or one that differs from a prepared source's fails here, on one line."""
    from trainer.data import build_data

    t = cfg.train
    build_data(cfg.data, t.seed, t.global_batch_size, t.micro_batch_size, cfg.model.vocab_size)


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


def check_shm_space(cfg, nproc: int, world_size: int, shm_dir: Path = SHM_DIR) -> None:
    """This node's snapshot slots (and its peer's replica) must fit in shared memory."""
    need = snapshot_bytes_per_node(cfg, nproc, world_size)
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize + _bytes_under(shm_dir / "perennial" / job_id(cfg.run.dir))
    if need > free:
        raise ValueError(
            f"{shm_dir} has {free / GIB:.2f} GiB free but checkpoint.interval="
            f"{cfg.checkpoint.interval} needs at least {need / GIB:.2f} GiB for the memory "
            f"snapshots of {nproc} local rank(s); enlarge {shm_dir} (docker: --shm-size) or set "
            f"checkpoint.interval=0"
        )


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
