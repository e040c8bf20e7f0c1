"""Process-group setup and the per-rank RNG state."""

from __future__ import annotations

import base64
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device_choice: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Join the process group torchrun/srun set up; a plain `python` run becomes a world of one
    so every code path (meshes, FSDP2, collectives) is the same."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"  # gloo for CPU-side collectives (checkpoint metadata)
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def say(message: str) -> None:
    """A status line on rank 0's stderr (the other ranks would repeat it)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def exit_skipping_teardown(code: int) -> NoReturn:
    """End a worker process after `destroy_process_group`, skipping interpreter finalization:
    gloo's worker threads can still hold tensors then, and tearing those down during
    finalization aborts the process (SIGABRT, "terminate called without an active exception"),
    which torchrun counts as a failed worker (pytorch PR #179291 describes the crash)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_mean(value: torch.Tensor, group=None) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value.item() / dist.get_world_size(group)


def rng_state(device: torch.device) -> dict:
    """This rank's generator states, base64-encoded for the JSON part of a checkpoint."""
    state = {"cpu": _encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(_decode(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode(state["cuda"]), device)


def seed_rng(seed: int, rank: int, step: int) -> None:
    """A well-defined stream for a (seed, rank, step) when no saved state fits the layout."""
    torch.manual_seed(hash((seed, rank, step)) % 2**63)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
