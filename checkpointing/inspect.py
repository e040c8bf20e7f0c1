"""Read-only tools on a checkpoint directory: describe, verify every byte, export weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from checkpointing.format import (
    FORMAT_VERSION,
    CheckpointDamaged,
    block_checksums,
    read_index,
    safetensors_header,
    tensor_bytes,
)
from checkpointing.model_state import MODEL_PREFIX
from checkpointing.reading import ShardFiles


def describe(checkpoint: Path) -> dict[str, Any]:
    """Step, saved world size and every tensor's global shape, dtype, size and shard count."""
    index = read_index(checkpoint)
    return {
        "path": str(checkpoint),
        "format_version": FORMAT_VERSION,
        "step": index.step,
        "world_size": index.world_size,
        "block_size": index.block_size,
        "files": sorted(index.files),
        "total_bytes": sum(t.nbytes for t in index.tensors.values()),
        "tensors": {
            name: {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "bytes": t.nbytes,
                "shards": len(t.boxes),
                "layout": t.layout,
            }
            for name, t in sorted(index.tensors.items())
        },
    }


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"checkpoint {info['path']}",
        f"step {info['step']}, saved by {info['world_size']} ranks into {len(info['files'])} "
        f"files, {info['total_bytes']} tensor bytes, format v{info['format_version']}",
    ]
    width = max((len(name) for name in info["tensors"]), default=0)
    for name, t in info["tensors"].items():
        layout = f"  [{t['layout']['kind']}]" if t["layout"] else ""
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(
            f"  {name:<{width}}  {shape:>14}  {t['dtype']:<9} {t['bytes']:>12} B  "
            f"{t['shards']} shard(s){layout}"
        )
    return "\n".join(lines)


def verify(checkpoint: Path) -> list[str]:
    """Every problem found reading every byte; an empty list means the checkpoint is intact."""
    try:
        index = read_index(checkpoint)
    except CheckpointDamaged as err:
        return [str(err)]
    problems = []
    for name, info in sorted(index.files.items()):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {info['size']}")
        elif not _header_intact(path, info["header_crc32"]):
            problems.append(f"{name}: safetensors header does not match its checksum")
    with ShardFiles(checkpoint, index) as files:
        for name, saved in sorted(index.tensors.items()):
            for box in saved.boxes:
                try:
                    files.read_box(name, box)
                except CheckpointDamaged as err:
                    problems.append(str(err))
    return problems


def export_safetensors(checkpoint: Path, out: Path, prefix: str = MODEL_PREFIX) -> int:
    """Write the `prefix` tensors into one safetensors file keyed by the name after `prefix`.

    Tensors are assembled and written one at a time (each checksum-verified), so memory holds
    at most one logical tensor. Returns the number of tensors written.
    """
    index = read_index(checkpoint)
    names = sorted(name for name in index.tensors if name.startswith(prefix))
    if not names:
        raise ValueError(f"checkpoint {checkpoint} has no tensors named {prefix}*")
    entries = [
        (name.removeprefix(prefix), t.dtype, list(t.shape), t.nbytes)
        for name, t in ((n, index.tensors[n]) for n in names)
    ]
    temp = out.with_name(out.name + ".partial")
    try:
        with ShardFiles(checkpoint, index) as files, open(temp, "wb") as f:
            f.write(safetensors_header(entries))
            for name in names:
                f.write(tensor_bytes(files.read_tensor(name)))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, out)
    return len(names)


def _header_intact(path: Path, expected_crc: int) -> bool:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(0)
        header = f.read(8 + length)
    return block_checksums(header, max(len(header), 1))[0] == expected_crc
