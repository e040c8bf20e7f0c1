"""Restore from the memory tier: agree on the newest step every rank can see complete, then read
it through the same box logic (DCP planner + verifying reader) as a disk checkpoint.

Each rank lists the complete (checksummed) slots its node's keeper holds; the lists are
gathered, and a step counts only when the slots of every rank of the world that took it are
complete. A rank reads boxes from its own node's files first; a box it can only find on another
node's files (a layout change across real nodes) reads as missing, and all ranks fall back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from checkpointing import collectives
from checkpointing.format import CheckpointIndex, SavedBox, SavedTensor, dtype_from_name
from checkpointing.layout import Layout, to_logical, validate_request
from checkpointing.storage import ShardViewLoadPlanner, VerifyingShardReader


@dataclass
class MemoryRestore:
    step: int
    global_state: dict[str, Any]
    rank_states: list[dict[str, Any]]
    source: str


def complete_steps(manifests: list[dict[str, Any]], newer_than: int) -> list[int]:
    """Steps newer than `newer_than` whose slots are complete for every rank, newest first."""
    ranks_by_step: dict[int, set[int]] = {}
    world_by_step: dict[int, int] = {}
    for m in manifests:
        ranks_by_step.setdefault(m["step"], set()).add(m["rank"])
        world_by_step[m["step"]] = m["world_size"]
    return sorted((s for s, ranks in ranks_by_step.items()
                   if s > newer_than and ranks == set(range(world_by_step[s]))), reverse=True)


def build_index(manifests: list[dict[str, Any]], step: int, prefer: str) -> CheckpointIndex:
    """The index of snapshot `step`; boxes held twice point at files under `prefer` if any."""
    chosen = sorted((m for m in manifests if m["step"] == step),
                    key=lambda m: (m["file"].startswith(prefer), m["rank"]))
    files: dict[str, dict[str, int]] = {}
    meta: dict[str, tuple] = {}
    boxes: dict[str, dict[tuple, SavedBox]] = {}
    for m in chosen:  # later (preferred) entries overwrite earlier ones
        files[m["file"]] = {"size": m["size"], "header_crc32": m["header_crc32"]}
        records = m["layout"].get("records", {})
        for entry, crcs in zip(m["layout"]["entries"], m["crc32"]):
            name = entry["name"]
            box = SavedBox(tuple(entry["offsets"]), tuple(entry["sizes"]), m["file"],
                           entry["byte_offset"], entry["byte_length"], tuple(crcs))
            meta[name] = (tuple(entry["shape"]), dtype_from_name(entry["dtype"]),
                          records.get(name))
            boxes.setdefault(name, {})[box.offsets] = box
    tensors = {
        name: SavedTensor(meta[name][0], meta[name][1],
                          tuple(sorted(b.values(), key=lambda box: box.offsets)), meta[name][2])
        for name, b in boxes.items()
    }
    return CheckpointIndex(step, chosen[0]["world_size"], chosen[0]["block_size"], files, tensors)


def request_problem(index: CheckpointIndex, logical: dict, declared: dict) -> str | None:
    try:
        validate_request(f"memory snapshot {index.step}", index, logical, declared)
    except ValueError as err:
        return str(err)
    return None


def restore_from_memory(
    local_manifests: list[dict[str, Any]],
    shm_root: Path,
    own_dir: str,
    tensors: dict[str, torch.Tensor],
    newer_than: int,
    group: dist.ProcessGroup | None = None,
    layouts: Sequence[Layout] = (),
    skipped: list[str] | None = None,
) -> MemoryRestore | None:
    """Collective: fill `tensors` from the newest usable memory snapshot newer than
    `newer_than`; each one found unusable is named (and appended to `skipped`)."""
    gathered = collectives.all_gather_strings(json.dumps(local_manifests), group)
    manifests = [m for text in gathered for m in json.loads(text)]
    for step in complete_steps(manifests, newer_than):  # the same list on every rank
        problem = _load_step(manifests, step, shm_root, own_dir, tensors, group, layouts)
        if problem is None:
            by_rank = {m["rank"]: m for m in manifests if m["step"] == step}
            return MemoryRestore(
                step=step,
                global_state=by_rank[0]["global_state"],
                rank_states=[by_rank[r]["rank_state"] for r in range(len(by_rank))],
                source=f"memory snapshot of step {step} ({shm_root})",
            )
        if collectives.rank(group) == 0:
            print(f"skipping memory snapshot {step}: {problem}", file=sys.stderr, flush=True)
        if skipped is not None:
            skipped.append(f"memory snapshot {step}: {problem}")
    return None


def _load_step(manifests: list[dict[str, Any]], step: int, shm_root: Path, own_dir: str,
               tensors: dict[str, torch.Tensor], group, layouts: Sequence[Layout]) -> str | None:
    """Collective: read snapshot `step` into `tensors`; the problem every rank agrees on."""
    index = build_index(manifests, step, prefer=own_dir + "/")
    logical, declared = to_logical(tensors, layouts)
    problem = collectives.agree_on_problem(request_problem(index, logical, declared), group)
    if problem:
        return problem
    reader = VerifyingShardReader(shm_root, index)
    dcp.load(logical, storage_reader=reader, planner=ShardViewLoadPlanner(),
             process_group=group, no_dist=not collectives.is_distributed(group))
    return collectives.agree_on_problem(reader.damage, group)
