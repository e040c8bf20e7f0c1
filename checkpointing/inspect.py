"""Read-only tools on a checkpoint directory: describe, verify every byte, export weights."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpointing.commit import metadata_problems
from checkpointing.format import (
    FORMAT_VERSION,
    CheckpointDamaged,
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


MAX_NAMES_SHOWN = 5


@dataclass
class VerifyReport:
    """What `verify` found: damage grouped by the file it is in (index.json, a shard, ...)."""

    checkpoint: Path
    files: int = 0
    boxes: int = 0
    damaged_boxes: int = 0
    damage: dict[str, list[str]] = field(default_factory=dict)
    tensors: dict[str, set[str]] = field(default_factory=dict)
    """Damaged tensors by file."""

    def add(self, problem: str, tensor: str | None = None) -> None:
        file = problem.split(":", 1)[0].split(" ", 1)[0]  # every problem names its file first
        self.damage.setdefault(file, []).append(problem)
        if tensor is not None:
            self.tensors.setdefault(file, set()).add(tensor)

    @property
    def problems(self) -> list[str]:
        return [p for found in self.damage.values() for p in found]

    def summary(self) -> list[str]:
        """One line per damaged file (its first problem and how many more), then the counts."""
        lines = []
        for file, found in sorted(self.damage.items()):
            names = sorted(self.tensors.get(file, ()))
            shown = ", ".join(repr(n) for n in names[:MAX_NAMES_SHOWN])
            if len(names) > MAX_NAMES_SHOWN:
                shown += f" and {len(names) - MAX_NAMES_SHOWN} more"
            lines.append(f"  {found[0]}" + (f"; damaged tensors: {shown}" if names else ""))
        lines.append(f"{len(self.damage)} damaged file(s); {self.damaged_boxes} of {self.boxes} "
                     f"tensor shard(s) in {self.files} file(s) unreadable")
        return lines


def verify(checkpoint: Path) -> VerifyReport:
    """Read every byte with the loader's own checks (metadata_problems, then ShardFiles)."""
    report = VerifyReport(checkpoint)
    for problem in metadata_problems(checkpoint):
        report.add(problem)
    try:
        index = read_index(checkpoint)
    except CheckpointDamaged:
        return report
    report.files = len(index.files)
    with ShardFiles(checkpoint, index) as files:
        for name, saved in sorted(index.tensors.items()):
            for box in saved.boxes:
                report.boxes += 1
                try:
                    files.read_box(name, box)
                except CheckpointDamaged as err:
                    report.damaged_boxes += 1
                    report.add(str(err), name)
    return report


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
