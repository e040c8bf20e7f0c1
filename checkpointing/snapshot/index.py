"""Snapshot manifests as a checkpoint index: one function for the keeper's persist and the
memory restore, so both see the same boxes, files and layouts.

A manifest describes one rank's slot of one step (its box entries, block checksums, JSON
states); copies of it (the owner keeper's and its peer's replica) are byte-identical, so the
index names each rank's slot by its on-disk shard name and the reader picks a copy.
"""

from __future__ import annotations

import math
from typing import Any

from checkpointing.format import (
    FORMAT_VERSION,
    CheckpointIndex,
    SavedBox,
    SavedTensor,
    dtype_from_name,
    shard_file_name,
)


def index_from_manifests(manifests: list[dict[str, Any]], step: int) -> CheckpointIndex:
    """The index of snapshot `step` from one manifest per rank (any subset of the world).
    A box several ranks hold (a replicated tensor, one copy per node) appears once."""
    files: dict[str, dict[str, int]] = {}
    meta: dict[str, tuple] = {}
    boxes: dict[str, dict[tuple, SavedBox]] = {}
    chosen = sorted((m for m in manifests if m["step"] == step), key=lambda m: m["rank"])
    assert chosen, f"no manifest of step {step}"
    for m in chosen:
        file = shard_file_name(m["rank"])
        files[file] = {"size": m["size"], "header_crc32": m["header_crc32"]}
        records = m["layout"].get("records", {})
        for entry, crcs in zip(m["layout"]["entries"], m["crc32"]):
            name = entry["name"]
            box = SavedBox(tuple(entry["offsets"]), tuple(entry["sizes"]), file,
                           entry["byte_offset"], entry["byte_length"], tuple(crcs))
            meta[name] = (tuple(entry["shape"]), dtype_from_name(entry["dtype"]),
                          records.get(name))
            boxes.setdefault(name, {}).setdefault(box.offsets, box)  # first holder wins
    tensors = {
        name: SavedTensor(meta[name][0], meta[name][1],
                          tuple(sorted(b.values(), key=lambda box: box.offsets)), meta[name][2])
        for name, b in boxes.items()
    }
    return CheckpointIndex(step, chosen[0]["world_size"], chosen[0]["block_size"], files, tensors)


def state_from_manifests(manifests: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """state.json of snapshot `step`: the global state (rank 0's) and every rank's state."""
    by_rank = {m["rank"]: m for m in manifests if m["step"] == step}
    world_size = by_rank[0]["world_size"]
    assert sorted(by_rank) == list(range(world_size)), f"ranks {sorted(by_rank)} saved"
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "global_state": by_rank[0]["global_state"],
        "rank_states": [by_rank[r]["rank_state"] for r in range(world_size)],
    }


def copies_by_step(manifests: list[dict[str, Any]]) -> dict[tuple[int, int], dict[int, list]]:
    """(step, world size) -> rank -> every complete copy of that rank's slot, in list order."""
    out: dict[tuple[int, int], dict[int, list]] = {}
    for m in manifests:
        out.setdefault((m["step"], m["world_size"]), {}).setdefault(m["rank"], []).append(m)
    return out


def missing_ranks(copies: dict[int, list], world_size: int) -> list[int]:
    return [r for r in range(world_size) if r not in copies]


def uncovered_tensors(index: CheckpointIndex, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The requested tensors some part of which no box of `index` holds (boxes of one tensor
    never overlap: each is one rank's shard or one node's copy of a replica, deduplicated)."""
    missing = []
    for name, shape in shapes.items():
        saved = index.tensors.get(name)
        covered = sum(math.prod(b.sizes) for b in saved.boxes) if saved else 0
        if covered < math.prod(shape):
            missing.append(name)
    return missing
