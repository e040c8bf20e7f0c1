"""A rank's snapshot slot: a preallocated file laid out as a safetensors shard, plus its manifest.

The layout is fixed for a run (shapes do not change between steps), so the header is written
once when the slot is created and every snapshot only overwrites tensor bytes. Each entry is a
box of a global tensor, named `<fqn>@<offsets>` exactly like the on-disk shards, so persisting a
slot is a plain file copy and restoring from it uses the same box logic as a disk checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.planner_helpers import _create_write_items

from checkpointing.format import (
    SavedBox,
    block_checksums,
    dtype_from_name,
    dtype_name,
    safetensors_header,
)

SLOTS_PER_RANK = 2


@dataclass(frozen=True)
class BoxEntry:
    """One local box: where it sits in the global tensor and in the slot file."""

    name: str
    shape: tuple[int, ...]  # global shape
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    byte_offset: int  # from the start of the file
    byte_length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "byte_offset": self.byte_offset,
            "byte_length": self.byte_length,
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> BoxEntry:
        return BoxEntry(
            name=obj["name"],
            shape=tuple(obj["shape"]),
            dtype=dtype_from_name(obj["dtype"]),
            offsets=tuple(obj["offsets"]),
            sizes=tuple(obj["sizes"]),
            byte_offset=int(obj["byte_offset"]),
            byte_length=int(obj["byte_length"]),
        )

    def saved_box(self, file: str, block_crc32: list[int]) -> SavedBox:
        return SavedBox(
            self.offsets, self.sizes, file, self.byte_offset, self.byte_length, tuple(block_crc32)
        )


def local_boxes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """name -> (global shape, offsets, sizes) of this rank's box, as DCP's planner sees it."""
    boxes = {}
    for name, value in tensors.items():
        (item,) = _create_write_items(name, value)
        chunk = item.tensor_data.chunk
        boxes[name] = (tuple(item.tensor_data.size), tuple(chunk.offsets), tuple(chunk.sizes))
    return boxes


def local_data(value: torch.Tensor) -> torch.Tensor:
    """The bytes this rank holds: a DTensor's local shard or the plain tensor."""
    return value.to_local() if hasattr(value, "to_local") else value


@dataclass(frozen=True)
class SlotLayout:
    """Header bytes and box entries of one rank's slot file; identical for both slots."""

    header: bytes
    entries: tuple[BoxEntry, ...]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Layout records (checkpointing.layout) of the tensors that declare one, by name."""

    @property
    def size(self) -> int:
        return len(self.header) + sum(e.byte_length for e in self.entries)

    @staticmethod
    def build(
        tensors: dict[str, torch.Tensor], owned: set[str],
        records: dict[str, dict[str, Any]] | None = None,
    ) -> SlotLayout:
        """Lay out the boxes this rank owns, largest itemsize first so every entry is aligned
        for its dtype and the data section has no holes (a valid safetensors file)."""
        boxes = local_boxes({n: tensors[n] for n in owned})
        order = sorted(owned, key=lambda n: (-tensors[n].dtype.itemsize, n))
        specs = []
        for name in order:
            shape, offsets, sizes = boxes[name]
            dtype = tensors[name].dtype
            specs.append((name, shape, dtype, offsets, sizes, math.prod(sizes) * dtype.itemsize))
        header = safetensors_header(
            [(f"{n}@{','.join(map(str, o))}", d, list(s), b) for n, _, d, o, s, b in specs]
        )
        entries, offset = [], len(header)
        for name, shape, dtype, offsets, sizes, nbytes in specs:
            entries.append(BoxEntry(name, shape, dtype, offsets, sizes, offset, nbytes))
            offset += nbytes
        return SlotLayout(header, tuple(entries), dict(records or {}))

    def to_json(self, header: bool = True) -> dict[str, Any]:
        """`header=False`: without the safetensors header (its checksum is in the manifest),
        as a restore needs it."""
        out = {"entries": [e.to_json() for e in self.entries], "records": self.records}
        return {"header": self.header.hex(), **out} if header else out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> SlotLayout:
        entries = tuple(BoxEntry.from_json(e) for e in obj["entries"])
        return SlotLayout(bytes.fromhex(obj["header"]), entries, obj.get("records", {}))


def slot_file_name(rank: int, slot: int) -> str:
    return f"rank-{rank:05d}.slot{slot}"


def manifest_name(rank: int, slot: int) -> str:
    return slot_file_name(rank, slot) + ".json"


def create_slot_file(path: Path, layout: SlotLayout) -> None:
    """Reserve the whole file now (posix_fallocate: ENOSPC here, not a SIGBUS later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, layout.size)
        os.pwrite(fd, layout.header, 0)
    finally:
        os.close(fd)


class MappedSlot:
    """A slot file mapped into this process; `views()` are tensors over its entries."""

    def __init__(self, path: Path, layout: SlotLayout) -> None:
        self.path = path
        self.layout = layout
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), layout.size)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def views(self) -> dict[str, torch.Tensor]:
        out = {}
        for e in self.layout.entries:
            raw = self.bytes[e.byte_offset : e.byte_offset + e.byte_length]
            out[e.name] = raw.view(e.dtype).view(e.sizes)
        return out

    def close(self) -> None:
        del self.bytes
        self.map.close()


def box_checksums(data: memoryview, layout: SlotLayout, block_size: int) -> list[list[int]]:
    """crc32 per block of every box, counted from each box's first byte (as on disk)."""
    return [
        block_checksums(data[e.byte_offset : e.byte_offset + e.byte_length], block_size)
        for e in layout.entries
    ]


def write_json_atomically(path: Path, obj: dict[str, Any]) -> None:
    """tmpfs needs no fsync; rename makes the manifest switch atomic for readers."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(temp, path)


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
