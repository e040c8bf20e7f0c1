"""The scaling-with-ranks half of scripts/bench_scaling.py: the same total state sharded with
FSDP2 over 1, 2 and 4 gloo ranks on this machine (one "node", one real keeper for it).

Per world size: the slowest rank's stall of a Perennial snapshot (`snapshot()` +
`wait_copied()`) vs DCP `dcp.async_save` (until it returns), interleaved after a warm-up round;
then the slowest rank's load time (Perennial CheckpointManager vs DCP) of a checkpoint saved
by the same world size, page cache warm for both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from checkpointing import CheckpointManager
from checkpointing.snapshot import SnapshotEngine
from scripts.bench_reshard import build_state, timed
from scripts.bench_snapshot import KeeperProcess
from scripts.report import fmt_ms, median_spread
from tests.distributed import run_distributed

MIB = 1 << 20
WORLD_SIZES = (1, 2, 4)
STATE = {False: dict(width=2048, depth=11), True: dict(width=512, depth=6)}  # 528 / 18 MiB
REPEATS = {False: 3, True: 2}


def slowest(seconds: float) -> float:
    """The maximum over ranks of this rank's `seconds` (a collective)."""
    value = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
               for t in tensors.values())


def snapshot_stall(engine: SnapshotEngine, tensors: dict, step: int) -> float:
    start = time.perf_counter()
    assert engine.snapshot(step, tensors, {"step": step}, {}), "snapshot skipped"
    engine.wait_copied()
    stall = time.perf_counter() - start
    engine.drain()  # the keeper's checksum, not counted
    return stall


def dcp_async_stall(tensors: dict, path: Path) -> float:
    start = time.perf_counter()
    future = dcp.async_save(tensors, checkpoint_id=str(path))
    stall = time.perf_counter() - start
    # The background write runs collectives on the default group: drained before any other.
    future.result()
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path)
    return stall


def measure_stalls(tensors: dict, engine: SnapshotEngine, workdir: Path, repeats: int) -> dict:
    stalls: dict[str, list[float]] = {"ours": [], "dcp": []}
    for round_index in range(repeats + 1):
        ours = slowest(snapshot_stall(engine, tensors, 2 * round_index + 1))
        if round_index == 0:
            snapshot_stall(engine, tensors, 2 * round_index + 2)  # the second slot's first touch
        theirs = slowest(dcp_async_stall(tensors, workdir / "dcp_async"))
        if round_index:
            stalls["ours"].append(ours)
            stalls["dcp"].append(theirs)
    return stalls


def measure_loads(tensors: dict, workdir: Path, repeats: int) -> dict:
    manager = CheckpointManager(workdir / "ours", keep=1)
    ours_path = manager.save(1, tensors)
    dcp.save(tensors, checkpoint_id=str(workdir / "dcp"))
    loads: dict[str, list[float]] = {"ours": [], "dcp": []}
    for _ in range(repeats):
        loads["ours"].append(timed(lambda: manager.load(ours_path, tensors)))
        loads["dcp"].append(timed(lambda: dcp.load(tensors, checkpoint_id=str(workdir / "dcp"))))
    return loads


def rank_worker(width: int, depth: int, repeats: int, port: int, shm_root: str,
                workdir: str) -> dict:
    """Rank body: FSDP2-sharded state with AdamW moments, random contents."""
    torch.set_num_threads(1)
    tensors = build_state(width, depth, "fsdp")
    with torch.no_grad():
        for value in tensors.values():
            if value.is_floating_point() and value.dim() > 0:
                (value.to_local() if hasattr(value, "to_local") else value).normal_()
    engine = SnapshotEngine(f"127.0.0.1:{port}", shm_root, 0)
    try:
        stalls = measure_stalls(tensors, engine, Path(workdir), repeats)
    finally:
        engine.close()
    loads = measure_loads(tensors, Path(workdir), repeats)
    total = torch.tensor(local_bytes(tensors), dtype=torch.int64)
    dist.all_reduce(total)
    return {"rank_bytes": local_bytes(tensors), "bytes": total.item(), "stalls": stalls,
            "loads": loads}


def measure_ranks(quick: bool) -> dict[int, dict]:
    results = {}
    for world in WORLD_SIZES:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-ranks-") as workdir:
            keeper = KeeperProcess(Path(workdir) / "keeper-checkpoints", world)
            try:
                args = (*STATE[quick].values(), REPEATS[quick], keeper.port,
                        str(keeper.shm_root), workdir)
                results[world] = run_distributed(rank_worker, world, args=args, timeout=1800)[0]
            finally:
                keeper.close()
        stalls = results[world]["stalls"]
        print(f"{world} rank(s): stall ours {median_spread(stalls['ours'])[0] * 1e3:.1f} ms, "
              f"DCP {median_spread(stalls['dcp'])[0] * 1e3:.1f} ms", flush=True)
    return results


def ranks_section(results: dict[int, dict]) -> list[str]:
    total = next(iter(results.values()))["bytes"]
    lines = [
        "### 2. Scaling with ranks", "",
        f"The same {total / MIB:,.0f} MiB of state sharded with FSDP2 over 1, 2 and 4 gloo "
        f"ranks on this {os.cpu_count()}-core machine, one real keeper for the node; times are "
        "the slowest rank's. Loads read a checkpoint saved by the same world size, page cache "
        "warm. Expected: per-rank bytes fall as 1/N, so the stall falls with N until the "
        f"processes outnumber the cores (here {max(WORLD_SIZES)} processes on {os.cpu_count()} "
        "cores), while a load is bounded by the total bytes read and stays roughly flat.", "",
        "| ranks | state per rank (MiB) | Perennial stall (ms) | DCP async_save stall (ms) | "
        "DCP / Perennial | Perennial load (ms) | DCP load (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for world, result in results.items():
        stalls, loads = result["stalls"], result["loads"]
        ratio = median_spread(stalls["dcp"])[0] / median_spread(stalls["ours"])[0]
        lines.append(f"| {world} | {result['rank_bytes'] / MIB:,.1f} | {fmt_ms(stalls['ours'])} "
                     f"| {fmt_ms(stalls['dcp'])} | {ratio:.1f}x | {fmt_ms(loads['ours'])} | "
                     f"{fmt_ms(loads['dcp'])} |")
    return [*lines, "", trend_line(results)]


def trend_line(results: dict[int, dict]) -> str:
    def relative(kind: str, method: str) -> str:
        one = median_spread(results[WORLD_SIZES[0]][kind][method])[0]
        return " / ".join(f"{median_spread(results[w][kind][method])[0] / one:.2f}"
                          for w in WORLD_SIZES)
    sizes = " / ".join(str(w) for w in WORLD_SIZES)
    return (f"Measured, relative to 1 rank at {sizes} ranks: Perennial stall "
            f"{relative('stalls', 'ours')}, DCP async_save stall {relative('stalls', 'dcp')}; "
            f"Perennial load {relative('loads', 'ours')}, DCP load {relative('loads', 'dcp')}.")
