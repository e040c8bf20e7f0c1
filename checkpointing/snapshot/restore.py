"""Restore from the memory tier: agree on the newest step whose every rank's slot some
surviving keeper holds complete, then read it through the same box logic (DCP planner +
verifying reader) as a disk checkpoint, into whatever world is restoring.

One rank per keeper lists what its keeper holds, the node's own slots and the replicas it keeps
for its peer; the lists are gathered (every rank sees the same copies, so all agree on the
step). Each rank reads the boxes it needs from the copy on its own node's keeper if there is
one, otherwise over the network from another keeper (checkpointing/snapshot/fetch.py).
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
from checkpointing.format import CheckpointIndex, shard_file_name
from checkpointing.layout import Layout, to_logical, validate_request
from checkpointing.snapshot.fetch import Copy, CopyReader
from checkpointing.snapshot.index import (
    copies_by_step,
    index_from_manifests,
    missing_ranks,
    state_from_manifests,
    uncovered_tensors,
)
from checkpointing.storage import ShardViewLoadPlanner


@dataclass
class MemoryRestore:
    step: int
    global_state: dict[str, Any]
    rank_states: list[dict[str, Any]]
    source: str
    bytes_remote: int = 0
    """Bytes this rank fetched from other nodes' keepers."""


@dataclass(frozen=True)
class Holder:
    """Where the copies a keeper lists live: `local` when this process can read them."""

    keeper: str
    host: str
    shm_root: str


def tag_copies(listing: dict[str, Any], holder: Holder, run_id: str | None = None
               ) -> dict[str, Any]:
    """A keeper's `list` reply as this rank contributes it: its copies (of run `run_id`, when
    given) tagged with where they live; each slot layout once, named by keeper and rank."""
    manifests = [{**m, "keeper": holder.keeper, "host": holder.host, "shm_root": holder.shm_root,
                  "layout_key": f"{holder.keeper}/{m['layout_key']}"}
                 for m in listing["manifests"] if run_id is None or m.get("run_id") == run_id]
    used = {m["layout_key"] for m in manifests}
    layouts = {f"{holder.keeper}/{k}": v for k, v in listing["layouts"].items()}
    return {"manifests": manifests, "layouts": {k: v for k, v in layouts.items() if k in used}}


def _with_layouts(contributions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    layouts = {k: v for c in contributions for k, v in c["layouts"].items()}
    return [{**m, "layout": layouts[m["layout_key"]]} for c in contributions
            for m in c["manifests"]]


def request_problem(index: CheckpointIndex, logical: dict, declared: dict) -> str | None:
    try:
        validate_request(f"memory snapshot {index.step}", index, logical, declared)
    except ValueError as err:
        return str(err)
    return None


def restore_from_memory(
    listed: dict[str, Any] | None,
    me: Holder,
    tensors: dict[str, torch.Tensor],
    newer_than: int,
    group: dist.ProcessGroup | None = None,
    layouts: Sequence[Layout] = (),
    skipped: list[str] | None = None,
) -> MemoryRestore | None:
    """Collective: fill `tensors` from the newest usable memory snapshot newer than
    `newer_than`. `listed`: the copies this rank's keeper holds (tag_copies), or None on every
    rank but one per keeper. Each snapshot found unusable is named (and added to `skipped`).

    The gathered metadata is one manifest per slot copy and one layout per rank copy: the
    size of a checkpoint index (x copies), sent once, not once per rank."""
    gathered = collectives.all_gather_strings(json.dumps(listed), group)
    manifests = _with_layouts([c for text in gathered if (c := json.loads(text)) is not None])
    logical, declared = to_logical(tensors, layouts)
    by_step = copies_by_step(manifests)
    for step, world in sorted(by_step, reverse=True):  # the same order on every rank
        if step <= newer_than:
            break
        copies = by_step[(step, world)]
        problem = _missing(copies, world, step, logical)
        if problem is None:
            problem, remote = _load_step(copies, step, me, logical, declared, group)
        if problem is None:
            state = state_from_manifests([c[0] for c in copies.values()], step)
            return MemoryRestore(step, state["global_state"], state["rank_states"],
                                 f"memory snapshot of step {step} ({_places(copies)})", remote)
        if collectives.rank(group) == 0:
            print(f"skipping memory snapshot {step}: {problem}", file=sys.stderr, flush=True)
        if skipped is not None:
            skipped.append(f"memory snapshot {step}: {problem}")
    return None


def _missing(copies: dict[int, list], world: int, step: int, logical: dict) -> str | None:
    """Which boxes no surviving keeper holds complete (the same answer on every rank)."""
    lost = missing_ranks(copies, world)
    if not lost:
        return None
    index = index_from_manifests([c[0] for c in copies.values()], step)
    tensors = uncovered_tensors(index, {n: tuple(v.size()) for n, v in logical.items()})
    shown = ", ".join(repr(t) for t in tensors[:4]) + (" ..." if len(tensors) > 4 else "")
    return (f"no surviving keeper holds a complete copy of the slots of rank(s) {lost} of "
            f"{world}; boxes of {len(tensors)} tensor(s) are missing ({shown or 'none'})")


def _places(copies: dict[int, list]) -> str:
    return ", ".join(sorted({c["keeper"] for held in copies.values() for c in held}))


def _sources(copies: dict[int, list], me: Holder) -> dict[str, list[Copy]]:
    """Per shard name, the copies in the order this rank tries them: its own node's first."""
    sources = {}
    for rank, held in copies.items():
        ordered = []
        for m in held:
            local = m["host"] == me.host and m["shm_root"] == me.shm_root
            ordered.append(Copy(m["file"], m["step"], m["keeper"], local))
        sources[shard_file_name(rank)] = sorted(ordered, key=lambda c: (not c.local, c.keeper))
    return sources


def _load_step(copies, step: int, me: Holder, logical: dict, declared: dict,
               group) -> tuple[str | None, int]:
    """Collective: read snapshot `step` into `logical`; the problem every rank agrees on."""
    index = index_from_manifests([held[0] for held in copies.values()], step)
    problem = collectives.agree_on_problem(request_problem(index, logical, declared), group)
    if problem:
        return problem, 0
    reader = CopyReader(Path(me.shm_root), index, _sources(copies, me))
    dcp.load(logical, storage_reader=reader, planner=ShardViewLoadPlanner(),
             process_group=group, no_dist=not collectives.is_distributed(group))
    for copy, why in reader.failed.items():
        print(f"warning: rank {collectives.rank(group)}: copy {copy.path} on keeper "
              f"{copy.keeper} unusable ({why}); read another copy", file=sys.stderr, flush=True)
    return collectives.agree_on_problem(reader.damage, group), reader.bytes_remote
