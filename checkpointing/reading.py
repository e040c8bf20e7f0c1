"""Verified reads of saved boxes: only the checksummed blocks (or column tiles) covering the
needed bytes, fetched and verified by a thread pool.

A request whose columns are a strict part of a tiled box (a tensor-parallel `Shard(1)` rank)
reads just the tiles covering its columns; any other request reads the linear blocks covering
its rows. Small reads lying back to back in one file are coalesced into one `preadv`; large
ones are split into chunks so the pool shares them. preadv and both checksums release the GIL,
so the threads overlap I/O and verification. Every byte handed back has been verified.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpointing.format import (
    CHECKSUMS,
    CheckpointDamaged,
    CheckpointIndex,
    SavedBox,
    header_problem,
)
from checkpointing.tiles import covering, geometry

_MAX_PREAD = 1 << 30
CHUNK_BYTES = 16 << 20  # a large read is split into tasks of about this size
COALESCE_BYTES = 1 << 20  # reads under this size, back to back in one file, become one preadv
BATCH_BYTES = 256 << 20  # staging memory held at once (beyond the targets themselves)


def default_threads() -> int:
    """Threads for one rank's reads: its cores, capped where page-cache copies stop scaling."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass
class Request:
    """Read the sub-box (`offsets`, `lengths`, relative to the saved box) into `target`."""

    name: str
    box: SavedBox
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    target: torch.Tensor
    staging: torch.Tensor | None = None  # bytes [lo, hi) of the box, when not read in place
    lo: int = 0
    hi: int = 0


class ShardFiles:
    """Open shard files of one checkpoint; use as a context manager. Thread-safe."""

    def __init__(self, directory: Path, index: CheckpointIndex, threads: int = 1) -> None:
        self.directory = directory
        self.index = index
        self.threads = threads
        self.checksum = CHECKSUMS[index.checksum]
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._boxes = {
            (name, box.offsets): box for name, t in index.tensors.items() for box in t.boxes
        }

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc) -> None:
        for mapped in self._maps.values():
            with contextlib.suppress(BufferError):  # a caller still holds a view: GC closes it
                mapped.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()

    # -- the serial API used by inspect, export and growth --------------------------------
    def read_region(self, name, box_offsets, offsets, lengths) -> torch.Tensor:
        """The sub-box (`offsets`, `lengths`, relative to the saved box) of one saved box."""
        box = self._boxes[(name, tuple(box_offsets))]
        out = torch.empty(tuple(lengths), dtype=self.index.tensors[name].dtype)
        self.read_into([Request(name, box, tuple(offsets), tuple(lengths), out)])
        return out

    def read_box(self, name: str, box: SavedBox) -> torch.Tensor:
        return self.read_region(name, box.offsets, (0,) * len(box.sizes), box.sizes)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole logical tensor, assembled box by box."""
        saved = self.index.tensors[name]
        out = torch.empty(saved.shape, dtype=saved.dtype)
        requests = []
        for box in saved.boxes:
            target = out
            for dim, (offset, size) in enumerate(zip(box.offsets, box.sizes)):
                target = target.narrow(dim, offset, size)
            requests.append(Request(name, box, (0,) * len(box.sizes), box.sizes, target))
        self.read_into(requests)
        return out

    # -- parallel reads -------------------------------------------------------------------
    def read_into(self, requests: list[Request]) -> None:
        """Fill every request's target; raises CheckpointDamaged on the first damage found."""
        with ThreadPoolExecutor(max(1, self.threads)) as pool:
            for batch in _batches([r for r in requests if r.target.numel()]):
                tiled = [r for r in batch if self._column_slice(r)]
                linear = [r for r in batch if not self._column_slice(r)]
                tasks = [lambda r=r: self._read_tiles(r) for r in tiled]
                tasks += self._fetch_tasks(linear)
                _run_all(pool, tasks, self.threads)
                places = [lambda r=r: _place(r) for r in linear if r.staging is not None]
                _run_all(pool, places, self.threads)

    def _column_slice(self, r: Request) -> bool:
        return (
            r.box.tiles is not None and len(r.box.sizes) > 1 and r.lengths[1] < r.box.sizes[1]
        )

    def _fetch_tasks(self, requests: list[Request]) -> list:
        """Tasks reading + verifying the linear blocks of each request (coalesced / chunked)."""
        for r in requests:
            self._plan_span(r)
        tasks, run, run_bytes = [], [], 0
        for r in sorted(requests, key=lambda r: (r.box.file, r.box.byte_offset + r.lo)):
            size = r.hi - r.lo
            if size > 2 * CHUNK_BYTES:
                tasks += [lambda r=r, part=part: self._fetch([r], part) for part in self._chunks(r)]
                continue
            if run and not (_adjacent(run[-1], r) and run_bytes + size <= COALESCE_BYTES):
                tasks.append(lambda run=run: self._fetch(run))
                run, run_bytes = [], 0
            run.append(r)
            run_bytes += size
        if run:
            tasks.append(lambda run=run: self._fetch(run))
        return tasks

    def _plan_span(self, r: Request) -> None:
        """Set r.lo, r.hi (the block-aligned bytes of the box to read) and r.staging."""
        start, stop = _byte_range(r, self.index.tensors[r.name].dtype.itemsize)
        bs = self.index.block_size
        r.lo, r.hi = start // bs * bs, min(math.ceil(stop / bs) * bs, r.box.byte_length)
        whole = tuple(r.lengths[1:]) == tuple(r.box.sizes[1:])
        if whole and (r.lo, r.hi) == (start, stop) and r.target.is_contiguous():
            r.staging = None  # read straight into the target
        else:
            r.staging = torch.empty(r.hi - r.lo, dtype=torch.uint8)

    def _chunks(self, r: Request) -> list[tuple[int, int]]:
        step = max(CHUNK_BYTES // self.index.block_size, 1) * self.index.block_size
        return [(a, min(a + step, r.hi)) for a in range(r.lo, r.hi, step)]

    def _fetch(self, run: list[Request], part: tuple[int, int] | None = None) -> None:
        """One preadv of adjacent requests (or of part [a, b) of one), then verify its blocks."""
        if part is None:
            views = [(r, _bytes_of(r), r.lo) for r in run]
        else:
            r = run[0]
            views = [(r, _bytes_of(r)[part[0] - r.lo : part[1] - r.lo], part[0])]
        first = views[0]
        offset = first[0].box.byte_offset + first[2]
        self._pread(first[0].box.file, [v.numpy() for _, v, _ in views], offset, first[0])
        for r, view, lo in views:
            self._verify_blocks(r, view, lo)

    def _verify_blocks(self, r: Request, data: torch.Tensor, lo: int) -> None:
        bs = self.index.block_size
        buf = data.numpy()
        for i in range(0, len(buf), bs):
            block = (lo + i) // bs
            if self.checksum(buf[i : i + bs]) != r.box.block_crc32[block]:
                raise self._mismatch(r, f"block {block}")

    def _read_tiles(self, r: Request) -> None:
        """Gather, verify and place the tiles covering a column slice of a tiled box."""
        tiles, box = r.box.tiles, r.box
        dtype = self.index.tensors[r.name].dtype
        rows, cols, inner = geometry(box.sizes, dtype.itemsize)
        whole = np.frombuffer(self._map(box.file, r), np.uint8, box.byte_length, box.byte_offset)
        view = whole.reshape(rows, cols * inner)
        r0, c0 = r.offsets[:2]
        r1, c1 = r0 + r.lengths[0], c0 + r.lengths[1]
        width = len(tiles.cols) - 1
        for g in covering(tiles.rows, r0, r1):
            ga, gb = tiles.rows[g], tiles.rows[g + 1]
            for s in covering(tiles.cols, c0, c1):
                sa, sb = tiles.cols[s], tiles.cols[s + 1]
                tile = view[ga:gb, sa * inner : sb * inner].copy()
                self._count(tile.nbytes)
                if self.checksum(tile) != tiles.checksums[g * width + s]:
                    raise self._mismatch(r, f"tile (rows {ga}:{gb}, columns {sa}:{sb})")
                source = torch.from_numpy(tile).view(dtype).view(gb - ga, sb - sa, *box.sizes[2:])
                _place_tile(r, source, (ga, sa), (r0, c0), (r1, c1))
        del view, whole

    def _mismatch(self, r: Request, where: str) -> CheckpointDamaged:
        return CheckpointDamaged(
            f"{r.box.file}: checksum mismatch in {where} of tensor {r.name!r} "
            f"(shard at offsets {list(r.box.offsets)})"
        )

    def _fd(self, file: str, r: Request) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = self._open_checked(file)
                except FileNotFoundError as err:
                    message = f"{file} is missing (needed for tensor {r.name!r})"
                    raise CheckpointDamaged(message) from err
            return self._fds[file]

    def _open_checked(self, file: str) -> int:
        """Open a shard file after checking its safetensors header (one check for every reader:
        loads, memory restores and `ckpt verify`)."""
        fd = os.open(self.directory / file, os.O_RDONLY)
        problem = header_problem(fd, self.index.files.get(file, {}).get("header_crc32"))
        if problem:
            os.close(fd)
            raise CheckpointDamaged(f"{file}: {problem}")
        return fd

    def _map(self, file: str, r: Request) -> mmap.mmap:
        fd = self._fd(file, r)
        with self._lock:
            if file not in self._maps:
                size = os.fstat(fd).st_size
                if size < r.box.byte_offset + r.box.byte_length:  # mapping past EOF would SIGBUS
                    raise CheckpointDamaged(
                        f"{file}: short file for tensor {r.name!r} ({size} bytes)"
                    )
                self._maps[file] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            return self._maps[file]

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def _pread(self, file: str, buffers: list[np.ndarray], offset: int, r: Request) -> None:
        fd = self._fd(file, r)
        size = sum(b.nbytes for b in buffers)
        done = 0
        try:
            while done < size:
                count = os.preadv(fd, _remaining(buffers, done), offset + done)
                if count == 0:
                    break
                done += count
        except OSError as err:
            raise CheckpointDamaged(f"{file}: cannot read tensor {r.name!r}: {err}") from err
        self._count(done)
        if done != size:
            raise CheckpointDamaged(
                f"{file}: short read of tensor {r.name!r} "
                f"({done} of {size} bytes at offset {offset})"
            )


def _byte_range(r: Request, itemsize: int) -> tuple[int, int]:
    """Bytes [start, stop) of the box holding the rows the request needs."""
    if not r.box.sizes:
        return 0, r.box.byte_length
    row_bytes = math.prod(r.box.sizes[1:]) * itemsize
    return r.offsets[0] * row_bytes, (r.offsets[0] + r.lengths[0]) * row_bytes


def _bytes_of(r: Request) -> torch.Tensor:
    if r.staging is not None:
        return r.staging
    return r.target.detach().reshape(-1).view(torch.uint8)


def _place(r: Request) -> None:
    """Copy the needed region out of a request's staged rows into its target."""
    dtype = r.target.dtype
    start, stop = _byte_range(r, dtype.itemsize)
    rows = r.staging[start - r.lo : stop - r.lo].view(dtype)
    if not r.box.sizes:
        r.target.copy_(rows.view(()))
        return
    rows = rows.view(r.lengths[0], *r.box.sizes[1:])
    for dim in range(1, len(r.box.sizes)):
        rows = rows.narrow(dim, r.offsets[dim], r.lengths[dim])
    with torch.no_grad():
        r.target.copy_(rows)
    r.staging = None


def _place_tile(r: Request, tile: torch.Tensor, tile_at, want_lo, want_hi) -> None:
    """Copy the part of a tile (at box position `tile_at`) that the request wants."""
    src, dst = tile, r.target
    for dim in (0, 1):
        lo = max(tile_at[dim], want_lo[dim])
        hi = min(tile_at[dim] + tile.shape[dim], want_hi[dim])
        src = src.narrow(dim, lo - tile_at[dim], hi - lo)
        dst = dst.narrow(dim, lo - want_lo[dim], hi - lo)
    for dim in range(2, len(r.box.sizes)):
        src = src.narrow(dim, r.offsets[dim], r.lengths[dim])
    with torch.no_grad():
        dst.copy_(src)


def _remaining(buffers: list[np.ndarray], done: int) -> list[np.ndarray]:
    out = []
    for buf in buffers:
        if done >= buf.nbytes:
            done -= buf.nbytes
            continue
        out.append(buf[done : done + _MAX_PREAD])
        done = 0
    return out


def _batches(requests: list[Request]):
    """Requests in groups whose staging (at most their bytes) stays under BATCH_BYTES."""
    batch, size = [], 0
    for r in requests:
        nbytes = r.target.numel() * r.target.element_size()
        if batch and size + nbytes > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += nbytes
    if batch:
        yield batch


def _adjacent(last: Request, r: Request) -> bool:
    return (
        last.box.file == r.box.file
        and last.box.byte_offset + last.hi == r.box.byte_offset + r.lo
    )


def _run_all(pool: ThreadPoolExecutor, tasks: list, threads: int) -> None:
    """Run tasks on the pool; re-raise the first failure after all of them finished."""
    if len(tasks) <= 1 or threads <= 1:
        for task in tasks:
            task()
        return
    futures = [pool.submit(task) for task in tasks]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
