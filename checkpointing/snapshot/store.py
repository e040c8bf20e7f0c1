"""The keeper's view of one directory of slots: layouts, manifests, pins and capacity.

Manifest states: `writing` (a worker is copying; a crash leaves it torn and it is ignored),
`copied` (bytes complete, not yet checksummed), `complete` (checksummed; counts for restore).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from checkpointing.format import (
    DEFAULT_BLOCK_SIZE,
    METADATA_CRC_KEY,
    metadata_crc_problem,
    with_metadata_crc,
)
from checkpointing.snapshot.persist import header_crc
from checkpointing.snapshot.slots import (
    SLOTS_PER_RANK,
    SlotLayout,
    create_slot_file,
    manifest_name,
    read_json_or_none,
    slot_file_name,
    write_json_atomically,
)

MIB = 1 << 20


class SlotStore:
    """Slots of the ranks of one node under `directory` (a subdirectory of `shm_root`), all of
    run `run_id`: slots another run left are never adopted."""

    def __init__(self, shm_root: Path, directory: Path, run_id: str = "") -> None:
        self.shm_root = shm_root
        self.directory = directory
        self.run_id = run_id
        directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.layouts: dict[int, SlotLayout] = {}
        self.manifests: dict[tuple[int, int], dict[str, Any]] = {}
        self.pins: dict[tuple[int, int], int] = {}
        self._adopt()

    def _adopt(self) -> None:
        """Take over slots a previous keeper of this run left (it crashed; memory survived)."""
        for path in sorted(self.directory.glob("rank-*.layout.json")):
            obj = self._read_checked(path)
            if obj is None:
                continue
            rank = int(obj["rank"])
            self.layouts[rank] = SlotLayout.from_json(obj["layout"])
            for slot in range(SLOTS_PER_RANK):
                manifest = self._read_checked(self.directory / manifest_name(rank, slot))
                if manifest is not None:
                    self.manifests[(rank, slot)] = manifest

    def _read_checked(self, path: Path) -> dict[str, Any] | None:
        """A layout or manifest file, or None (with the reason) when it is damaged or another
        run's."""
        obj = read_json_or_none(path)
        if obj is None:
            return None
        problem = metadata_crc_problem(obj)
        if problem is None and obj.get("run_id") != self.run_id:
            problem = f"it belongs to run {obj.get('run_id')!r}, not {self.run_id!r}"
        if problem:
            print(f"[keeper] not adopting {path}: {problem}", file=sys.stderr, flush=True)
            return None
        obj.pop(METADATA_CRC_KEY)
        return obj

    def _write(self, path: Path, obj: dict[str, Any]) -> None:
        write_json_atomically(path, with_metadata_crc({**obj, "run_id": self.run_id}))

    def relative(self, rank: int, slot: int) -> str:
        return str((self.directory / slot_file_name(rank, slot)).relative_to(self.shm_root))

    def path(self, rank: int, slot: int) -> Path:
        return self.directory / slot_file_name(rank, slot)

    # -- lifecycle ------------------------------------------------------------------------
    def ensure_slots(self, rank: int, layout: SlotLayout, expected_ranks: int) -> list[str]:
        """Create (or keep, when the layout is unchanged) the two slot files of a rank."""
        with self.lock:
            if self.layouts.get(rank) == layout:
                return [self.relative(rank, s) for s in range(SLOTS_PER_RANK)]
            self.check_capacity(layout.size, expected_ranks)
            self.drop(rank)
            for slot in range(SLOTS_PER_RANK):
                create_slot_file(self.path(rank, slot), layout)
            self._write(self.directory / f"rank-{rank:05d}.layout.json",
                        {"rank": rank, "layout": layout.to_json()})
            self.layouts[rank] = layout
            return [self.relative(rank, s) for s in range(SLOTS_PER_RANK)]

    def check_capacity(self, slot_bytes: int, expected_ranks: int) -> None:
        stat = os.statvfs(self.directory)
        free = stat.f_bavail * stat.f_frsize + sum(
            self.path(r, s).stat().st_size
            for r in self.layouts
            for s in range(SLOTS_PER_RANK)
            if self.path(r, s).exists()
        )
        missing = expected_ranks - len(self.layouts)
        need = SLOTS_PER_RANK * slot_bytes * max(missing, 1)
        if need > free:
            raise ValueError(
                f"{self.directory.parent} has {free / MIB:.3g} MiB free but the memory tier needs "
                f"{SLOTS_PER_RANK} slots x {max(missing, 1)} local ranks x "
                f"{slot_bytes / MIB:.3g} MiB = {need / MIB:.3g} MiB; enlarge /dev/shm or set "
                f"checkpoint.interval=0"
            )

    def drop(self, rank: int) -> None:
        with self.lock:
            self.layouts.pop(rank, None)
            for slot in range(SLOTS_PER_RANK):
                self.manifests.pop((rank, slot), None)
                for path in (self.path(rank, slot), self.directory / manifest_name(rank, slot)):
                    path.unlink(missing_ok=True)

    def drop_ranks_outside(self, world_size: int) -> None:
        for rank in [r for r in self.layouts if r >= world_size]:
            self.drop(rank)

    def remove_all(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- snapshots ------------------------------------------------------------------------
    def choose_slot(self, rank: int) -> int | None:
        """Not pinned (persisting/replicating), oldest first; None if both are pinned."""
        free = [s for s in range(SLOTS_PER_RANK) if not self.pins.get((rank, s))]
        if not free:
            return None
        return min(free, key=lambda s: self._age_key(rank, s))

    def _age_key(self, rank: int, slot: int) -> tuple[int, int]:
        m = self.manifests.get((rank, slot))
        if m is None or m["state"] != "complete":
            return (0, 0)
        return (1, m["step"])

    def set_manifest(self, rank: int, slot: int, manifest: dict[str, Any]) -> None:
        with self.lock:
            self.manifests[(rank, slot)] = manifest
            self._write(self.directory / manifest_name(rank, slot), manifest)

    def begin(self, rank: int, step: int, world_size: int) -> int | None:
        with self.lock:
            slot = self.choose_slot(rank)
            if slot is not None:
                self.set_manifest(rank, slot, self.new_manifest(rank, slot, step, world_size))
            return slot

    def new_manifest(self, rank: int, slot: int, step: int, world_size: int) -> dict[str, Any]:
        layout = self.layouts[rank]
        return {
            "run_id": self.run_id,
            "rank": rank,
            "slot": slot,
            "step": step,
            "state": "writing",
            "world_size": world_size,
            "file": self.relative(rank, slot),
            "size": layout.size,
            "header_crc32": header_crc(layout.header),
            "block_size": DEFAULT_BLOCK_SIZE,
        }

    def complete_manifests(self) -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for (rank, _), m in sorted(self.manifests.items()):
                if m["state"] == "complete" and rank in self.layouts:
                    out.append({**m, "layout": self.layouts[rank].to_json()})
            return out

    def complete_ranks_at(self, step: int) -> list[dict[str, Any]]:
        return [m for m in self.complete_manifests() if m["step"] == step]

    def pin(self, rank: int, slot: int, delta: int) -> None:
        with self.lock:
            self.pins[(rank, slot)] = self.pins.get((rank, slot), 0) + delta
