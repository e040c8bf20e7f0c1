"""Checks for the usual launch mistakes, run before any worker starts. Each raises a one-line
ValueError that names the problem and what to change.

`perennial slurm` runs them at submission time; `perennial train` runs `preflight(...)` before
starting torchrun. The `/dev/shm` size check belongs to the snapshot keeper (it knows the
snapshot's size) and runs where the keeper starts.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from trainer.config_loader import validate_layout


def preflight(cfg, nproc: int, nnodes: int, rdzv_endpoint: str = "") -> None:
    check_world_size(cfg, nproc, nnodes)
    check_run_dir_writable(cfg.run.dir)
    if rdzv_endpoint:
        check_rendezvous_port(rdzv_endpoint)


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
