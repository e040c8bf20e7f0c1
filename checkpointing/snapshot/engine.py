"""The worker side of the memory tier: copy this rank's boxes into the keeper's slots, lazily.

    engine = SnapshotEngine(keeper_address, shm_root, node_index)
    engine.snapshot(step, tensors, global_state, rank_state, persist=False)  # returns at once
    ...forward/backward overlap the copy...
    engine.wait_copied()          # right before optimizer.step() mutates the tensors

Plain tensors and DTensor replicas are copied by one rank per node (round robin), so a node
holds each box once. On GPU the copy runs on a side stream into the shared memory registered
as pinned; `wait_copied` only orders the compute stream after it (no host stall).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpointing import collectives
from checkpointing.layout import Layout, to_logical
from checkpointing.snapshot import faults
from checkpointing.snapshot.protocol import KeeperClient
from checkpointing.snapshot.restore import Holder, MemoryRestore, restore_from_memory, tag_copies
from checkpointing.snapshot.slots import (
    SLOTS_PER_RANK,
    MappedSlot,
    SlotLayout,
    local_boxes,
    local_data,
)

SLOT_WAIT_S = 300.0
"""How long a snapshot waits for a free slot (both are pinned while the keeper checksums,
replicates or persists them) before it is skipped, with a warning and counted."""


class SnapshotEngine:
    def __init__(
        self,
        keeper_address: str,
        shm_root: str | Path,
        node_index: int,
        process_group: dist.ProcessGroup | None = None,
        layouts: Sequence[Layout] = (),
        run_id: str = "",
        lists_node: bool = True,
    ) -> None:
        """`lists_node`: this rank speaks for its keeper at restore (one rank per keeper)."""
        self.client = KeeperClient(keeper_address)
        self.run_id = run_id
        self.layouts = tuple(layouts)
        self.shm_root = Path(shm_root)
        self.node_index = node_index
        self.group = process_group
        self.lists_node = lists_node
        self.nodes: list[int] = [node_index]
        """Node indices of this world's keepers (a persist waits for each one's part)."""
        self.node_ranks = 1
        """Ranks of this world that use this node's keeper."""
        self.rank = collectives.rank(process_group)
        self.world_size = collectives.world_size(process_group)
        self.layout: SlotLayout | None = None
        self.slots: list[MappedSlot] = []
        self.views: list[dict[str, torch.Tensor]] = []
        self._thread: threading.Thread | None = None
        self._event = None
        self._stream = None
        self.last_error: str | None = None
        self.skipped = 0
        """Snapshots skipped, on every rank alike: some rank found no free slot within
        SLOT_WAIT_S or could not reach its keeper (each also warned about)."""
        self.slot_wait_s = 0.0
        """Time spent waiting for a free slot (the keeper's work falling behind)."""
        self.restore_skipped: list[str] = []
        """Memory snapshots the last restore found unusable (named, and skipped)."""
        self.disabled: str | None = None
        """Why the memory tier turned itself off (it could not set up its slots), if it did."""

    # -- setup (first snapshot) ---------------------------------------------------------
    def _owned(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Boxes this rank copies: each (name, offsets) once per node, spread over its ranks."""
        mine = {name: list(box[1]) for name, box in local_boxes(tensors).items()}
        everyone = collectives.all_gather_strings(
            json.dumps({"node": self.node_index, "boxes": mine}), self.group
        )
        holders: dict[tuple[str, str], list[int]] = {}
        infos = [json.loads(text) for text in everyone]
        self.nodes = sorted({info["node"] for info in infos})
        self.node_ranks = sum(info["node"] == self.node_index for info in infos)
        for rank, info in enumerate(infos):
            if info["node"] != self.node_index:
                continue
            for name, offsets in info["boxes"].items():
                holders.setdefault((name, json.dumps(offsets)), []).append(rank)
        owned = set()
        for i, (key, ranks) in enumerate(sorted(holders.items())):
            if ranks[i % len(ranks)] == self.rank:
                owned.add(key[0])
        return owned

    def _setup(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layout = SlotLayout.build(tensors, self._owned(tensors), self._records(tensors))
        reply = self.client.request(
            {"cmd": "register", "rank": self.rank, "world_size": self.world_size,
             "layout": self.layout.to_json()}
        )
        self.slots = [MappedSlot(self.shm_root / f, self.layout) for f in reply["files"]]
        assert len(self.slots) == SLOTS_PER_RANK
        self.views = [slot.views() for slot in self.slots]
        if any(t.is_cuda for t in tensors.values()):
            self._setup_cuda()

    def _records(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Layout records for the index. Slots hold tensors as they are in memory, so only
        layouts whose saved form is the in-memory form (stacked experts) can be snapshotted."""
        _, records = to_logical(tensors, self.layouts)
        for name, record in records.items():
            if record["kind"] != "stacked":
                raise ValueError(f"memory snapshots cannot hold tensor {name!r}: its "
                                 f"{record['kind']} layout is saved in another form")
        return records

    def _setup_cuda(self) -> None:
        cudart = torch.cuda.cudart()
        for slot in self.slots:  # pin the shared memory so device->host copies are async DMA
            cudart.cudaHostRegister(slot.bytes.data_ptr(), slot.layout.size, 0)
        self._stream = torch.cuda.Stream()
        self._event = torch.cuda.Event()

    # -- snapshot -----------------------------------------------------------------------
    def snapshot(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        global_state: dict[str, Any],
        rank_state: dict[str, Any],
        persist: bool = False,
    ) -> bool:
        """Start copying `tensors` (same keys and shapes every time) as snapshot `step`.

        The JSON states are taken now; tensor bytes are copied in the background. Returns
        False when the snapshot was skipped (both slots busy, or the keeper is unreachable).
        """
        self.wait_copied()
        self._join_thread()
        if self.disabled or (self.layout is None and not self._set_up_or_disable(tensors)):
            return False
        problem = None
        try:
            slot = self._free_slot(step)
        except (OSError, RuntimeError) as err:
            slot, problem = None, f"keeper unreachable ({err})"
        if slot is None and problem is None:
            problem = f"no free slot within {SLOT_WAIT_S:.0f} s"
        # Every rank takes a step's snapshot or none does: a step one rank skipped can never be
        # restored, and the others' slots would hold it instead of an older, usable one (a
        # slot begun here and not filled stays `writing`: never used, reused first).
        problem = collectives.agree_on_problem(problem and f"rank {self.rank}: {problem}",
                                               self.group)
        if problem:
            self.skipped += 1
            return self._failed(f"snapshot of step {step} skipped on every rank: {problem} "
                                f"({self.skipped} skipped so far)")
        pairs = [(view, local_data(tensors[name]).detach())
                 for name, view in self.views[slot].items()]
        done = {"cmd": "done", "rank": self.rank, "slot": slot, "step": step,
                "global_state": global_state, "rank_state": rank_state, "persist": persist,
                "nodes": self.nodes, "node_ranks": self.node_ranks}
        if self._stream is not None:
            self._copy_on_side_stream(pairs)
        self._thread = threading.Thread(target=self._copy_then_report, args=(pairs, done),
                                        daemon=True)
        self._thread.start()
        return True

    def _free_slot(self, step: int) -> int | None:
        """Begin snapshot `step` in a free slot, waiting (bounded) while both are pinned."""
        begin = {"cmd": "begin", "rank": self.rank, "step": step, "world_size": self.world_size}
        start = time.monotonic()
        while (slot := self.client.request(begin)["slot"]) is None:
            if time.monotonic() - start > SLOT_WAIT_S:
                break
            time.sleep(0.02)
        self.slot_wait_s += time.monotonic() - start
        return slot

    def _set_up_or_disable(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Collective: map the slots on every rank, or turn the memory tier off on all (e.g. the
        shared memory is smaller in fact than the preflight estimate) and say why."""
        problem = None
        try:
            self._setup(tensors)
        except (OSError, RuntimeError) as err:
            problem = f"rank {self.rank}: {err}"
        problem = collectives.agree_on_problem(problem, self.group)
        if problem is None:
            return True
        self.disabled = problem
        if self.rank == 0:
            print(f"warning: memory snapshots are off: {problem}; the run goes on with disk "
                  "checkpoints", file=sys.stderr, flush=True)
        return False

    def _copy_on_side_stream(self, pairs) -> None:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)
        self._event.record(self._stream)

    def _copy_then_report(self, pairs, done: dict[str, Any]) -> None:
        try:
            if self._stream is not None:
                self._event.synchronize()
            else:
                with torch.no_grad():
                    for i, (dst, src) in enumerate(pairs):
                        if i == len(pairs) // 2:
                            faults.maybe_pause("copy", done["step"],
                                              f"rank {self.rank} step {done['step']}", self.rank)
                        dst.copy_(src)
            self.client.request(done)
        except (OSError, RuntimeError) as err:
            self._failed(f"snapshot of step {done['step']} lost: {err}")

    def wait_copied(self) -> None:
        """Call before the optimizer mutates the tensors: the copy must have read them."""
        if self._stream is not None and self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        else:
            self._join_thread()

    def _join_thread(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _failed(self, message: str) -> bool:
        self.last_error = message
        print(f"warning: rank {self.rank}: {message}", file=sys.stderr, flush=True)
        return False

    def restore(self, tensors: dict[str, torch.Tensor], newer_than: int) -> MemoryRestore | None:
        """Collective: load the newest memory snapshot newer than step `newer_than`, if any."""
        me = Holder(self.client.address, socket.gethostname(), str(self.shm_root))
        listed = None
        if self.lists_node:
            try:
                reply = self.client.request({"cmd": "list"})
                me = Holder(reply["address"], reply["host"], reply["shm_root"])
                listed = tag_copies(reply, me, self.run_id)  # never another run's
            except (OSError, RuntimeError) as err:
                self._failed(f"memory tier unavailable for restore: {err}")
        self.restore_skipped = []
        return restore_from_memory(listed, me, tensors, newer_than, self.group, self.layouts,
                                   self.restore_skipped)

    def drain(self) -> dict[str, Any]:
        """Wait until the keeper has checksummed, replicated and persisted what it has."""
        self._join_thread()
        return self.client.request({"cmd": "drain"})["status"]

    def close(self) -> None:
        self._join_thread()
        if self._stream is not None:
            cudart = torch.cuda.cudart()
            for slot in self.slots:
                cudart.cudaHostUnregister(slot.bytes.data_ptr())
        for slot in self.slots:
            slot.close()
        self.slots, self.views, self.layout = [], [], None
        self.client.close()
