"""Verified reads of saved boxes: only the checksummed blocks covering the needed bytes."""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

from checkpointing.format import CheckpointDamaged, CheckpointIndex, SavedBox, header_problem

_MAX_PREAD = 1 << 30


class ShardFiles:
    """Open shard files of one checkpoint; use as a context manager."""

    def __init__(self, directory: Path, index: CheckpointIndex) -> None:
        self.directory = directory
        self.index = index
        self._fds: dict[str, int] = {}
        self._boxes = {
            (name, box.offsets): box for name, t in index.tensors.items() for box in t.boxes
        }

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read_region(
        self,
        name: str,
        box_offsets: tuple[int, ...],
        offsets: tuple[int, ...],
        lengths: tuple[int, ...],
    ) -> torch.Tensor:
        """The sub-box (`offsets`, `lengths`, relative to the saved box) of one saved box.

        For a row-major box the rows [offsets[0], offsets[0] + lengths[0]) are one contiguous
        byte span; we read the blocks covering it and narrow the other dims in memory.
        """
        box = self._boxes[(name, tuple(box_offsets))]
        dtype = self.index.tensors[name].dtype
        if not box.sizes:
            return self._verified_bytes(name, box, 0, box.byte_length).view(dtype).view(())
        row_bytes = math.prod(box.sizes[1:]) * dtype.itemsize
        start, stop = offsets[0] * row_bytes, (offsets[0] + lengths[0]) * row_bytes
        rows = self._verified_bytes(name, box, start, stop).view(dtype)
        rows = rows.view(lengths[0], *box.sizes[1:])
        for dim in range(1, len(box.sizes)):
            rows = rows.narrow(dim, offsets[dim], lengths[dim])
        return rows

    def read_box(self, name: str, box: SavedBox) -> torch.Tensor:
        return self.read_region(name, box.offsets, (0,) * len(box.sizes), box.sizes)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole logical tensor, assembled box by box."""
        saved = self.index.tensors[name]
        out = torch.empty(saved.shape, dtype=saved.dtype)
        for box in saved.boxes:
            target = out
            for dim, (offset, size) in enumerate(zip(box.offsets, box.sizes)):
                target = target.narrow(dim, offset, size)
            target.copy_(self.read_box(name, box))
        return out

    def _verified_bytes(self, name: str, box: SavedBox, start: int, stop: int) -> torch.Tensor:
        """Bytes [start, stop) of a box as a uint8 tensor, after checking every covering block."""
        if stop <= start:
            return torch.empty(0, dtype=torch.uint8)
        block_size = self.index.block_size
        first, last = start // block_size, math.ceil(stop / block_size)
        lo, hi = first * block_size, min(last * block_size, box.byte_length)
        data = self._pread(box.file, hi - lo, box.byte_offset + lo, name)
        for block in range(first, last):
            piece = data[(block - first) * block_size : (block - first + 1) * block_size]
            if zlib.crc32(piece) != box.block_crc32[block]:
                raise CheckpointDamaged(
                    f"{box.file}: checksum mismatch in block {block} of tensor {name!r} "
                    f"(shard at offsets {list(box.offsets)})"
                )
        return torch.frombuffer(data, dtype=torch.uint8)[start - lo : stop - lo]

    def _open_checked(self, file: str) -> int:
        """Open a shard file after checking its safetensors header (one check for every reader:
        loads, memory restores and `ckpt verify`)."""
        fd = os.open(self.directory / file, os.O_RDONLY)
        problem = header_problem(fd, self.index.files.get(file, {}).get("header_crc32"))
        if problem:
            os.close(fd)
            raise CheckpointDamaged(f"{file}: {problem}")
        return fd

    def _pread(self, file: str, size: int, offset: int, name: str) -> bytearray:
        try:
            if file not in self._fds:
                self._fds[file] = self._open_checked(file)
            data = bytearray(size)
            view, done = memoryview(data), 0
            while done < size:
                count = os.preadv(self._fds[file], [view[done : done + _MAX_PREAD]], offset + done)
                if count == 0:
                    break
                done += count
        except FileNotFoundError as err:
            raise CheckpointDamaged(f"{file} is missing (needed for tensor {name!r})") from err
        except OSError as err:
            raise CheckpointDamaged(f"{file}: cannot read tensor {name!r}: {err}") from err
        if done != size:
            raise CheckpointDamaged(
                f"{file}: short read of tensor {name!r} ({done} of {size} bytes at offset {offset})"
            )
        return data
