"""Run a function on N real gloo ranks (separate processes), as torchtitan and OLMo-core tests do;
used by the tests and the benchmarks.

    results = run_distributed(fn, world_size=2, args=(tmp_path,))

`fn(*args)` runs in every rank with the default process group initialised (gloo, CPU);
`results[r]` is what rank r returned. A rank that raises fails the call with its traceback.
`fn` must be importable (module level) because ranks are spawned, not forked.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import exit_skipping_teardown


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        exit_skipping_teardown(0)  # the result is already in the pipe


def run_distributed(
    fn: Callable, world_size: int, args: tuple = (), timeout: float = 300
) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
            break
    for proc in procs:
        proc.join(timeout=5 if errors else timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
