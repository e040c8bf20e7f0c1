"""On-disk format of a Perennial checkpoint: names, dtypes, checksums and the JSON index.

Everything here is plain JSON or raw little-endian tensor bytes; nothing is ever pickled.
See docs/checkpoint-format.md for the user-facing description.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import torch

# Version 2 added crc32c block checksums, column tiles (SavedBox.tiles) and a checksum of
# index.json's and state.json's own content (METADATA_CRC_KEY); version 1 checkpoints (crc32,
# no tiles, unchecksummed metadata) stay readable.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_CRC_KEY = "metadata_crc32"
INDEX_FILE = "index.json"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
CHECKSUM_ALGORITHM = "crc32"  # the default of writers that do not choose (and of version 1)
FAST_CHECKSUM = "crc32c"  # hardware-assisted (SSE4.2 / ARMv8), ~5x zlib's crc32 here
# Both release the GIL on large buffers, so a thread pool verifies in parallel.
CHECKSUMS = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}
DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
STEP_DIR_PATTERN = re.compile(r"^step-(\d{8,})$")

# safetensors dtype names; the byte order of every file is little endian like the format requires.
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in _SAFETENSORS_DTYPES}


class CheckpointDamaged(ValueError):
    """A checkpoint on disk is missing data or fails a checksum; the message names the damage."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_file_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored in a checkpoint")
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"unknown dtype {name!r} in checkpoint index")
    return _DTYPES_BY_NAME[name]


def safetensors_dtype(dtype: torch.dtype) -> str:
    dtype_name(dtype)
    return _SAFETENSORS_DTYPES[dtype]


def block_checksums(
    data: memoryview | bytes, block_size: int, algorithm: str = CHECKSUM_ALGORITHM
) -> list[int]:
    """Checksum of each `block_size` piece of `data`, counted from the start of `data`."""
    checksum = CHECKSUMS[algorithm]
    return [checksum(data[i : i + block_size]) for i in range(0, len(data), block_size)]


def safetensors_header(entries: list[tuple[str, torch.dtype, list[int], int]]) -> bytes:
    """Length prefix + JSON header for (name, dtype, shape, nbytes) entries laid out back to back.

    The header is padded with spaces to a multiple of 8 bytes so tensor data stays aligned.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "perennial"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": safetensors_dtype(dtype),
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


@dataclass(frozen=True)
class Tiles:
    """Column-exact checksums of a box with >= 2 dims (format version 2).

    The box is cut at row boundaries `rows` (dim 0) and column boundaries `cols` (dim 1),
    both relative to the box; `checksums[g * (len(cols) - 1) + s]` covers rows
    [rows[g], rows[g + 1]) x columns [cols[s], cols[s + 1]), taken in row-major order. A
    reader needing a column slice reads and verifies only the tiles covering it.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    checksums: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "cols": list(self.cols), "checksums": list(self.checksums)}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Tiles:
        tiles = Tiles(*(tuple(int(x) for x in obj[key]) for key in ("rows", "cols", "checksums")))
        if len(tiles.checksums) != (len(tiles.rows) - 1) * (len(tiles.cols) - 1):
            raise ValueError("tile checksums do not match the tile grid")
        return tiles


@dataclass(frozen=True)
class SavedBox:
    """One saved shard of a logical tensor: a box of the global tensor and where its bytes live."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int
    block_crc32: tuple[int, ...]  # checksums of the index's algorithm, despite the name
    tiles: Tiles | None = None

    def to_json(self) -> dict[str, Any]:
        obj = {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "file": self.file,
            "byte_offset": self.byte_offset,
            "byte_length": self.byte_length,
            "block_crc32": list(self.block_crc32),
        }
        if self.tiles is not None:
            obj["tiles"] = self.tiles.to_json()
        return obj

    @staticmethod
    def from_json(obj: dict[str, Any]) -> SavedBox:
        return SavedBox(
            offsets=tuple(int(x) for x in obj["offsets"]),
            sizes=tuple(int(x) for x in obj["sizes"]),
            file=str(obj["file"]),
            byte_offset=int(obj["byte_offset"]),
            byte_length=int(obj["byte_length"]),
            block_crc32=tuple(int(x) for x in obj["block_crc32"]),
            tiles=Tiles.from_json(obj["tiles"]) if "tiles" in obj else None,
        )


@dataclass(frozen=True)
class SavedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    boxes: tuple[SavedBox, ...]
    layout: dict[str, Any] | None

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class CheckpointIndex:
    """The parsed index.json of one checkpoint."""

    step: int
    world_size: int
    block_size: int
    files: dict[str, dict[str, int]]  # name -> {"size": bytes, "header_crc32": crc}
    tensors: dict[str, SavedTensor]
    checksum: str = CHECKSUM_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "checksum": self.checksum,
            "block_size": self.block_size,
            "files": self.files,
            "tensors": {
                name: {
                    "shape": list(t.shape),
                    "dtype": dtype_name(t.dtype),
                    "layout": t.layout,
                    "shards": [box.to_json() for box in t.boxes],
                }
                for name, t in sorted(self.tensors.items())
            },
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> CheckpointIndex:
        version = obj.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported checkpoint format version {version!r}")
        if obj.get("checksum") not in CHECKSUMS or (version == 1 and obj["checksum"] != "crc32"):
            raise ValueError(f"unsupported checksum algorithm {obj.get('checksum')!r}")
        tensors = {
            name: SavedTensor(
                shape=tuple(int(x) for x in t["shape"]),
                dtype=dtype_from_name(t["dtype"]),
                boxes=tuple(SavedBox.from_json(box) for box in t["shards"]),
                layout=t.get("layout"),
            )
            for name, t in obj["tensors"].items()
        }
        files = {name: {k: int(v) for k, v in f.items()} for name, f in obj["files"].items()}
        return CheckpointIndex(
            step=int(obj["step"]),
            world_size=int(obj["world_size"]),
            block_size=int(obj["block_size"]),
            files=files,
            tensors=tensors,
            checksum=obj["checksum"],
        )


def read_index(checkpoint: Path) -> CheckpointIndex:
    """Parse index.json; raises CheckpointDamaged when it is missing or not a valid index."""
    obj = read_json(checkpoint / INDEX_FILE)
    try:
        return CheckpointIndex.from_json(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointDamaged(f"{INDEX_FILE} is not a valid checkpoint index: {err}") from err


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, its checksum verified (and removed from the object)."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise CheckpointDamaged(f"{path.name} is missing") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamaged(f"{path.name} is not valid JSON: {err}") from err
    except OSError as err:
        raise CheckpointDamaged(f"{path.name} cannot be read: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointDamaged(f"{path.name} does not hold a JSON object")
    problem = metadata_crc_problem(obj)
    if problem:
        raise CheckpointDamaged(f"{path.name}: {problem}")
    obj.pop(METADATA_CRC_KEY, None)
    return obj


def metadata_crc(obj: dict[str, Any]) -> int:
    """crc32 of the object's canonical JSON (sorted keys, compact), without the checksum key:
    Python's JSON round-trips every value exactly, so a reader recomputes the same bytes."""
    content = {k: v for k, v in obj.items() if k != METADATA_CRC_KEY}
    return zlib.crc32(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def metadata_crc_problem(obj: dict[str, Any]) -> str | None:
    """Why a parsed JSON object fails its checksum; None when intact (or written before v2)."""
    if METADATA_CRC_KEY not in obj:
        version = obj.get("format_version")
        if isinstance(version, int) and version < 2:
            return None
        return f"no {METADATA_CRC_KEY} (damaged, or not written by Perennial)"
    if obj[METADATA_CRC_KEY] != metadata_crc(obj):
        return "checksum mismatch (damaged metadata)"
    return None


def with_metadata_crc(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, METADATA_CRC_KEY: metadata_crc(obj)}


def header_problem(fd: int, expected_crc: int | None) -> str | None:
    """Why the safetensors header of an open shard file does not match its checksum, if so."""
    if expected_crc is None:
        return None
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    header = prefix + os.pread(fd, min(length, 100 << 20), 8)
    if len(header) < 8 or zlib.crc32(header) != expected_crc:
        return "checksum mismatch in the safetensors header"
    return None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (row-major), without a copy when contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_json_durably(path: Path, obj: dict[str, Any]) -> None:
    """A checkpoint's index.json or state.json, with its checksum (read_json checks it)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(with_metadata_crc(obj), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
