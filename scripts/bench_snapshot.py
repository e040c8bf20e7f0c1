"""Checkpoint stall, persist bandwidth, throughput cost and recovery time of Perennial's memory
snapshots, side by side with torch.save, torch DCP (save / async_save) and a memcpy, in one run.

    python scripts/bench_snapshot.py                  # 1.1 GiB of state, writes docs/benchmarks.md
    python scripts/bench_snapshot.py --quick --out -  # a few MB, prints the report only

Stall = the time the training loop is blocked by one checkpoint. For the snapshot engine that
is `snapshot()` + `wait_copied()` (the trainer calls the latter right before optimizer.step()).
Sections 3 and 4 (training jobs) live in scripts/bench_snapshot_jobs.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpointing.snapshot import SnapshotEngine  # noqa: E402
from checkpointing.snapshot.persist import copy_durably  # noqa: E402
from launch.keepers import SHM_BASE, _wait_listening  # noqa: E402
from scripts import bench_snapshot_jobs as jobs  # noqa: E402
from scripts.bench_snapshot_report import report  # noqa: E402
from scripts.report import REPO, replace_section  # noqa: E402
from trainer.distributed import free_port  # noqa: E402

MIB = 1 << 20
SIZES = {False: dict(width=4096, depth=6, repeats=3), True: dict(width=256, depth=4, repeats=3)}


def build_state(width: int, depth: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a Linear stack plus AdamW-like exp_avg / exp_avg_sq, random contents."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    tensors = {}
    for name, param in model.named_parameters():
        tensors[f"model.{name}"] = param.detach()
        for moment in ("exp_avg", "exp_avg_sq"):
            tensors[f"optimizer.state.{name}.{moment}"] = torch.empty_like(param).uniform_()
    return tensors


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class KeeperProcess:
    """One real keeper process, as `perennial train` starts it, for `local_ranks` ranks."""

    def __init__(self, checkpoint_dir: Path, local_ranks: int = 1) -> None:
        self.shm_root = SHM_BASE / f"bench-{os.getpid()}-{local_ranks}"
        self.port = free_port()
        cmd = [sys.executable, "-m", "checkpointing.snapshot.keeper", "--shm-root",
               str(self.shm_root), "--port", str(self.port), "--local-ranks", str(local_ranks),
               "--checkpoint-dir", str(checkpoint_dir), "--keep", "1", "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
        _wait_listening(self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=300)
        shutil.rmtree(self.shm_root, ignore_errors=True)


class Keeper(KeeperProcess):
    """A keeper for one local rank, with this process's snapshot engine attached."""

    def __init__(self, checkpoint_dir: Path) -> None:
        super().__init__(checkpoint_dir)
        self.engine = SnapshotEngine(f"127.0.0.1:{self.port}", self.shm_root, 0)

    def close(self) -> None:
        self.engine.close()
        super().close()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compute_step(a: torch.Tensor, iterations: int) -> None:
    """Stands in for forward/backward: one core of matmuls."""
    for _ in range(iterations):
        torch.mm(a, a)


class StallBench:
    """Every method saves the same tensors; each callable returns the seconds it blocked."""

    def __init__(self, tensors: dict[str, torch.Tensor], workdir: Path, keeper: Keeper):
        self.tensors, self.workdir, self.keeper = tensors, workdir, keeper
        self.floor_dst = {n: torch.empty_like(t) for n, t in tensors.items()}
        self.stager = DefaultStager(StagingOptions(False, False, False, False))
        self.async_stager = DefaultStager(StagingOptions(False, False, True, False))
        self.step = 0
        self.matrix = torch.rand(512, 512)
        self.compute_iters = 1

    def memcpy(self) -> float:
        def copy():
            for name, src in self.tensors.items():
                self.floor_dst[name].copy_(src)
        return timed(copy)

    def torch_save(self) -> float:
        path = self.workdir / "torch_save.pt"
        stall = timed(lambda: torch.save(self.tensors, path))
        path.unlink()
        return stall

    def dcp_save(self) -> float:
        path = self.workdir / "dcp"
        stall = timed(lambda: dcp.save(self.tensors, checkpoint_id=str(path), no_dist=True))
        shutil.rmtree(path)
        return stall

    def _dcp_async(self, stager) -> float:
        path = self.workdir / "dcp_async"
        start = time.perf_counter()
        future = dcp.async_save(self.tensors, checkpoint_id=str(path), no_dist=True,
                                async_stager=stager)
        stall = time.perf_counter() - start
        future.result()  # the background write, not counted; drained before the next sample
        shutil.rmtree(path)
        return stall

    def dcp_async_default(self) -> float:
        return self._dcp_async(None)

    def dcp_async_reused(self) -> float:
        return self._dcp_async(self.stager)

    def dcp_async_overlapped(self) -> tuple[float, float]:
        """Async staging in DCP's thread; the stall ends when staging is complete."""
        path = self.workdir / "dcp_async"
        start = time.perf_counter()
        response = dcp.async_save(self.tensors, checkpoint_id=str(path), no_dist=True,
                                  async_stager=self.async_stager)
        stall = time.perf_counter() - start
        busy = timed(lambda: compute_step(self.matrix, self.compute_iters))
        stall += timed(response.staging_completion.result)
        response.upload_completion.result()
        shutil.rmtree(path)
        return stall, busy

    def _snapshot(self, persist: bool = False) -> float:
        self.step += 1
        assert self.keeper.engine.snapshot(self.step, self.tensors, {"step": self.step}, {},
                                           persist), "snapshot skipped"
        return 0.0

    def ours_blocking(self) -> float:
        stall = timed(self._snapshot) + timed(self.keeper.engine.wait_copied)
        self.keeper.engine.drain()  # the keeper's checksum, not counted
        return stall

    def ours_overlapped(self) -> tuple[float, float]:
        """(stall, wall time of the compute step that ran while the copy did)."""
        stall = timed(self._snapshot)
        busy = timed(lambda: compute_step(self.matrix, self.compute_iters))
        stall += timed(self.keeper.engine.wait_copied)
        self.keeper.engine.drain()
        return stall, busy

    def compute_alone(self) -> float:
        return timed(lambda: compute_step(self.matrix, self.compute_iters))

    def calibrate(self, copy_s: float) -> None:
        """Size the stand-in compute step to about twice the copy."""
        one = min(timed(lambda: compute_step(self.matrix, 4)) for _ in range(3)) / 4
        self.compute_iters = max(1, round(2 * copy_s / one))


STALL_METHODS = {  # label -> StallBench method
    "memcpy into preallocated memory (floor)": "memcpy",
    "torch.save to disk (no fsync)": "torch_save",
    "DCP dcp.save": "dcp_save",
    "DCP dcp.async_save, default stager": "dcp_async_default",
    "DCP dcp.async_save, reused stager": "dcp_async_reused",
    "Perennial snapshot, wait right away": "ours_blocking",
}
OVERLAPPED = {  # label -> StallBench method returning (stall, compute time)
    "DCP dcp.async_save, async staging, overlapped": "dcp_async_overlapped",
    "Perennial snapshot, overlapped with compute": "ours_overlapped",
}


def measure_stalls(bench: StallBench, repeats: int) -> dict[str, list[float]]:
    """Methods interleaved round by round; one untimed warm-up round first (allocations,
    first touch of both snapshot slots)."""
    labels = [*STALL_METHODS, *OVERLAPPED, "compute alone"]
    labels += [f"compute beside: {label}" for label in OVERLAPPED]
    results: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(repeats + 1):
        for label, method in STALL_METHODS.items():
            sample = getattr(bench, method)()
            if method == "ours_blocking" and round_index == 0:
                bench.ours_blocking()  # the second slot's first touch
                bench.calibrate(bench.ours_blocking())
            if round_index:
                results[label].append(sample)
        samples = {"compute alone": bench.compute_alone()}
        for label, method in OVERLAPPED.items():
            samples[label], samples[f"compute beside: {label}"] = getattr(bench, method)()
        if round_index:
            for label, sample in samples.items():
                results[label].append(sample)
        print(f"stall round {round_index}: done", flush=True)
    return results


def raw_write(data: torch.Tensor, target: Path) -> float:
    """Sequential 64 MiB writes of in-memory bytes, then fsync."""
    view = memoryview(data.numpy()).cast("B")
    start = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        for offset in range(0, len(view), 64 * MIB):
            chunk, written = view[offset:offset + 64 * MIB], 0
            while written < len(chunk):
                written += f.write(chunk[written:])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def measure_persist(bench: StallBench, repeats: int) -> tuple[int, dict[str, list[float]]]:
    """MB/s of: raw write+fsync, the keeper's file copy alone, the keeper end to end."""
    engine = bench.keeper.engine
    size = engine.layout.size
    slot_file = engine.slots[0].path
    data = engine.slots[0].bytes.clone()  # the same bytes, in this process's memory

    def copy() -> float:
        target = bench.workdir / "copy.bin"
        elapsed = timed(lambda: copy_durably(slot_file, target, size))
        target.unlink()
        return elapsed

    persist_phase: list[float] = []

    def keeper() -> float:
        bench._snapshot(persist=True)
        engine.wait_copied()
        status = {}
        elapsed = timed(lambda: status.update(engine.drain()))
        assert status["persisted_step"] == bench.step, f"keeper did not persist: {status}"
        persist_phase.append(status["persist_seconds"])  # complete snapshot -> committed
        return elapsed

    ways = {"raw": lambda: raw_write(data, bench.workdir / "raw.bin"), "copy": copy,
            "keeper": keeper}
    results: dict[str, list[float]] = {key: [] for key in ways}
    for round_index in range(repeats):  # the order rotates: disk write-back hits all
        keys = list(ways)[round_index % 3:] + list(ways)[:round_index % 3]
        for key in keys:
            results[key].append(size / MIB / ways[key]())
    results["persist"] = [size / MIB / seconds for seconds in persist_phase]
    return size, results


def run(quick: bool, plot_path: Path | None = None) -> str:
    sizes = SIZES[quick]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        workdir = Path(tmp)
        tensors = build_state(sizes["width"], sizes["depth"])
        state_bytes = nbytes(tensors)
        keeper = Keeper(workdir / "keeper-checkpoints")
        try:
            bench = StallBench(tensors, workdir, keeper)
            stalls = measure_stalls(bench, sizes["repeats"])
            slot_bytes, persist = measure_persist(bench, sizes["repeats"])
        finally:
            keeper.close()
        del bench, tensors
        throughput = jobs.measure_throughput(workdir, quick)
        recovery = jobs.measure_recovery(workdir, quick)
    return report(state_bytes, stalls, slot_bytes, persist, throughput, recovery, sizes,
                  quick, plot_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few MB of state, short jobs")
    parser.add_argument("--out", default="docs/benchmarks.md", help="report file, or - to print")
    args = parser.parse_args()
    if args.out == "-":
        print(run(args.quick))
        return
    out = Path(args.out)
    text = run(args.quick, out.parent / "snapshot_stall.png")
    replace_section("snapshot", text, out)
    print(f"wrote the snapshot section of {args.out}")


if __name__ == "__main__":
    main()
