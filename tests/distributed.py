"""Run a function on N real gloo ranks (separate processes), as torchtitan and OLMo-core tests do;
used by the tests and the benchmarks in scripts/.

    results = run_distributed(fn, world_size=2, args=(tmp_path,))

`fn(*args)` runs in every rank with the default process group initialised (gloo, CPU);
`results[r]` is what rank r returned. `fn` must be importable (module level): ranks start from
a fork server that has imported torch once, so a rank costs a fork, not a torch import, while
still never inheriting the caller's threads or state; each rank takes the caller's environment
as it is at the call. The call never blocks past `timeout`: a rank that raises fails it with its
traceback, a rank that dies hard (SIGKILL, `os._exit`, a segfault) fails it with its exit code
as soon as the parent sees the death, and the ranks left (often stuck in a collective with the
dead one) are killed.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import exit_skipping_teardown, free_port

# What the fork server imports once for every rank it starts (about 6 s of CPU per rank here).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
           "torch.distributed.checkpoint"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return ctx


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, conn,
               environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's, not the fork server's (started earlier)
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
        _send(conn, ("ok", result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        _send(conn, ("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        exit_skipping_teardown(0)  # the result is already in the pipe


def _send(conn, message: tuple) -> None:
    """Plain pickle, not torch's ForkingPickler: a tensor then travels by value, not as a
    shared-memory handle the parent would fetch from this process after it has exited. A pipe
    write is synchronous: done before the rank exits."""
    conn.send_bytes(pickle.dumps(message))


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"exit code {code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


def run_distributed(
    fn: Callable, world_size: int, args: tuple = (), timeout: float = 300
) -> list[Any]:
    ctx = _context()
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, pipes[r][1], environ))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for _, sender in pipes:
        sender.close()  # the child holds the only write end: EOF once it is gone
    try:
        results = _collect([reader for reader, _ in pipes], procs, time.monotonic() + timeout)
    except BaseException:
        _reap(procs, grace_s=1)
        raise
    _reap(procs, grace_s=5)
    return [results[r] for r in range(world_size)]


def _collect(readers: list, procs: list, deadline: float) -> dict[int, Any]:
    """Each rank's result, read as it comes; the first failure (error, death, timeout) raises."""
    results: dict[int, Any] = {}
    waiting = dict(enumerate(readers))
    while waiting:
        ready = wait(list(waiting.values()), timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError(f"ranks {sorted(waiting)} gave no result within the timeout")
        for rank in [r for r, reader in waiting.items() if reader in ready]:
            try:
                status, payload = pickle.loads(waiting.pop(rank).recv_bytes())
            except EOFError:  # the pipe closed without a result: the rank died
                procs[rank].join(timeout=5)
                raise RuntimeError(
                    f"rank {rank} died before returning a result "
                    f"({describe_exit(procs[rank].exitcode)})"
                ) from None
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    return results


def _reap(procs: list, grace_s: float) -> None:
    """Join ranks that finished; kill the ones still running (stuck on a failed peer)."""
    for proc in procs:
        proc.join(timeout=grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
