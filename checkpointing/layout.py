"""Declarations for tensors whose in-memory form differs from their logical (saved) form.

A checkpoint always stores logical tensors. At the save/load boundary each declared tensor is
turned into `ShardView`s: views into the in-memory tensor, each tagged with the box of the
logical tensor it covers, so DCP's planners (dedup, box intersection) work on logical boxes and
loading writes straight into the in-memory tensor.

    Fused("attn.wqkv.weight", parts=("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"),
          sizes=(64, 16, 16))
    Padded("embed.weight", logical_size=50257)       # rows beyond 50257 are padding
    Stacked("moe.experts.w1", num_experts=8)         # dim 0 is the expert index

Names are parameter FQNs; a declaration also covers every flat key that contains the name as
dotted components (`model.<name>`, `optimizer.state.<name>.exp_avg`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


@dataclass(frozen=True)
class Fused:
    """`name` is the concat of `parts` along `dim`, with the given part sizes.

    per_part_sharding=True (the tensor-parallel convention): when the fused tensor is a DTensor
    sharded on `dim`, every rank holds the concat of its own shard of each part. False: the
    DTensor is a plain slice of the fused global tensor (e.g. FSDP2 on a fused weight).
    """

    name: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    dim: int = 0
    per_part_sharding: bool = True


@dataclass(frozen=True)
class Padded:
    """`name` is padded along `dim` beyond `logical_size`; padding is not saved, zeroed on load."""

    name: str
    logical_size: int
    dim: int = 0


@dataclass(frozen=True)
class Stacked:
    """`name` stacks `num_experts` experts on dim 0 (a normal tensor, declared for tooling)."""

    name: str
    num_experts: int


Layout = Fused | Padded | Stacked


@dataclass
class ShardView:
    """A box of a logical tensor held by this rank; `local` is a view of in-memory storage.

    Implements the hooks DCP's planner helpers look for (`__create_write_items__`,
    `__create_chunk_list__`), so DCP plans it exactly like a DTensor shard.
    """

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]

    def size(self) -> torch.Size:
        return torch.Size(self.global_shape)

    def local_at(self, offsets: tuple[int, ...]) -> torch.Tensor:
        """The in-memory view of the box at `offsets` (one box here; subclasses may hold more)."""
        return self.local

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(torch.Size(self.offsets), self.local.size())

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        data = TensorWriteData(
            chunk=self._chunk(),
            properties=TensorProperties.create_from_tensor(self.local),
            size=self.size(),
        )
        index = MetadataIndex(fqn, self.offsets)
        return [WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [] if self.local.numel() == 0 else [self._chunk()]


Saveable = torch.Tensor | ShardView


def to_logical(
    tensors: dict[str, torch.Tensor], layouts: list[Layout] | tuple[Layout, ...]
) -> tuple[dict[str, Saveable], dict[str, dict[str, Any]]]:
    """Logical state (views sharing storage with `tensors`) and a layout record per logical key."""
    logical: dict[str, Saveable] = {}
    records: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _find_layout(key, value, layouts)
        if match is None:
            logical[key] = value
            continue
        spec, prefix, suffix = match
        for name, (view, record) in _apply(key, value, spec, prefix, suffix).items():
            logical[name] = view
            records[name] = record
    return logical, records


def zero_padding(tensors: dict[str, torch.Tensor], layouts: list[Layout] | tuple[Layout, ...]):
    """Zero the padding of every padded tensor (it is not in the checkpoint)."""
    for key, value in tensors.items():
        match = _find_layout(key, value, layouts)
        if match is None or not isinstance(match[0], Padded):
            continue
        spec = match[0]
        local, offsets, _ = local_box(value)
        keep = max(0, min(local.shape[spec.dim], spec.logical_size - offsets[spec.dim]))
        with torch.no_grad():
            local.narrow(spec.dim, keep, local.shape[spec.dim] - keep).zero_()


def validate_request(where: str, index, logical: dict, declared: dict) -> None:
    """Every requested logical tensor is in `index` (a CheckpointIndex) with its shape and
    a compatible layout; `where` names the checkpoint in the error."""
    for name, value in logical.items():
        saved = index.tensors.get(name)
        if saved is None:
            raise ValueError(f"tensor {name!r} is not in {where}")
        if tuple(value.size()) != saved.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.size())} but {where} "
                f"saved shape {saved.shape}"
            )
        check_layout_compatible(name, saved.layout, declared.get(name))


def check_layout_compatible(name: str, saved: dict[str, Any] | None, declared: dict | None):
    """Stacking is part of a tensor's meaning and must agree; fusing and padding need not."""
    saved_stacked = saved.get("num_experts") if saved and saved["kind"] == "stacked" else None
    declared_stacked = (
        declared.get("num_experts") if declared and declared["kind"] == "stacked" else None
    )
    if saved_stacked != declared_stacked:
        raise ValueError(
            f"layout mismatch for tensor {name!r}: checkpoint has "
            f"{_describe(saved_stacked)}, the loading model declares {_describe(declared_stacked)}"
        )


def _describe(num_experts: int | None) -> str:
    return "no stacked experts" if num_experts is None else f"{num_experts} stacked experts"


def _find_layout(key: str, value: torch.Tensor, layouts) -> tuple[Layout, str, str] | None:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    for spec in layouts:
        name = spec.name
        if key == name:
            return spec, "", ""
        if key.startswith(name + "."):
            return spec, "", key[len(name) :]
        if key.endswith("." + name):
            return spec, key[: -len(name)], ""
        at = key.find("." + name + ".")
        if at >= 0:
            return spec, key[: at + 1], key[at + 1 + len(name) :]
    return None


def local_box(value: torch.Tensor) -> tuple[torch.Tensor, list[int], tuple[int, ...]]:
    if isinstance(value, DTensor):
        sizes, offsets = compute_local_shape_and_global_offset(
            value.shape, value.device_mesh, value.placements
        )
        local = value.to_local()
        assert tuple(local.shape) == tuple(sizes), f"uneven local shard {local.shape} != {sizes}"
        return local, list(offsets), tuple(value.shape)
    return value, [0] * value.dim(), tuple(value.shape)


def _apply(key: str, value: torch.Tensor, spec: Layout, prefix: str, suffix: str):
    if isinstance(spec, Stacked):
        if value.shape[0] != spec.num_experts:
            raise ValueError(
                f"tensor {key!r} declares {spec.num_experts} stacked experts but has shape "
                f"{tuple(value.shape)}"
            )
        return {key: (value, {"kind": "stacked", "num_experts": spec.num_experts})}
    if isinstance(spec, Padded):
        return {key: _padded_view(key, value, spec)}
    return _fused_views(key, value, spec, prefix, suffix)


def _padded_view(key: str, value: torch.Tensor, spec: Padded):
    local, offsets, shape = local_box(value)
    dim = spec.dim
    if shape[dim] < spec.logical_size:
        raise ValueError(f"tensor {key!r} is smaller than its declared logical size")
    keep = max(0, min(local.shape[dim], spec.logical_size - offsets[dim]))
    offsets[dim] = min(offsets[dim], spec.logical_size)
    logical_shape = shape[:dim] + (spec.logical_size,) + shape[dim + 1 :]
    view = ShardView(local.narrow(dim, 0, keep), tuple(offsets), logical_shape)
    return view, {"kind": "padded", "dim": dim, "padded_size": shape[dim]}


def _fused_views(key: str, value: torch.Tensor, spec: Fused, prefix: str, suffix: str):
    dim = spec.dim
    if value.shape[dim] != sum(spec.sizes) or len(spec.parts) != len(spec.sizes):
        raise ValueError(
            f"tensor {key!r} has size {value.shape[dim]} on dim {dim}, but its fused parts "
            f"declare sizes {list(spec.sizes)}"
        )
    ranges = None
    if _splits_per_part(value, spec):
        ranges = _part_ranges(value, spec)
        local, offsets, shape = value.to_local(), [0] * value.dim(), tuple(value.shape)
    else:
        local, offsets, shape = local_box(value)
    views = {}
    start = 0
    for i, (part, size) in enumerate(zip(spec.parts, spec.sizes)):
        if ranges is not None:  # each rank holds the concat of its shard of each part
            lo, hi = ranges[i]
            piece = local.narrow(dim, sum(b - a for a, b in ranges[:i]), hi - lo)
        else:  # intersect this rank's box of the fused tensor with the part's rows
            lo = min(max(offsets[dim], start), start + size)
            hi = max(min(offsets[dim] + local.shape[dim], start + size), lo)
            piece = local.narrow(dim, lo - offsets[dim] if hi > lo else 0, hi - lo)
            lo, hi = lo - start, hi - start
        part_offsets = offsets[:dim] + [lo] + offsets[dim + 1 :]
        part_shape = shape[:dim] + (size,) + shape[dim + 1 :]
        record = {"kind": "fused", "fused": key, "dim": dim, "part": i, "sizes": list(spec.sizes)}
        views[prefix + part + suffix] = (ShardView(piece, tuple(part_offsets), part_shape), record)
        start += size
    return views


def _splits_per_part(value: torch.Tensor, spec: Fused) -> bool:
    if not spec.per_part_sharding or not isinstance(value, DTensor):
        return False
    return any(isinstance(p, Shard) and p.dim == spec.dim for p in value.placements)


def _part_ranges(value: DTensor, spec: Fused) -> list[tuple[int, int]]:
    """This rank's [lo, hi) of every part, chunked like DTensor's Shard placement."""
    mesh_dims = [i for i, p in enumerate(value.placements) if isinstance(p, Shard)]
    others = [p for p in value.placements if not isinstance(p, (Shard, Replicate))]
    if len(mesh_dims) != 1 or others:
        raise ValueError(
            f"fused tensor {spec.name!r}: per-part sharding needs one Shard({spec.dim}) placement "
            f"and Replicate elsewhere, got {value.placements}"
        )
    num_chunks = value.device_mesh.size(mesh_dims[0])
    coordinate = value.device_mesh.get_local_rank(mesh_dims[0])
    ranges = []
    for size in spec.sizes:
        chunk = math.ceil(size / num_chunks)
        lo = min(coordinate * chunk, size)
        ranges.append((lo, min(lo + chunk, size)))
    local_rows = value.to_local().shape[spec.dim]
    if sum(hi - lo for lo, hi in ranges) != local_rows:
        raise ValueError(
            f"fused tensor {spec.name!r}: local shard has {local_rows} rows on dim {spec.dim}, "
            f"expected the concat of per-part shards {ranges}"
        )
    return ranges
