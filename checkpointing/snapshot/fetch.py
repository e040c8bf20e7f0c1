"""Read a memory snapshot's boxes from whichever keeper holds a copy of each rank's slot.

The index names each rank's slot by its shard name; `sources` lists that slot's complete
copies, this node's own keeper's first (read straight from shared memory), then the other
surviving keepers' (byte ranges over the keeper protocol, `read`). Every block read is checked
against the manifest's checksums by ShardFiles; a copy that fails (checksum, missing file, a
keeper gone mid-read) is dropped and the same bytes are read from the next copy.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpointing.format import CheckpointIndex, header_problem
from checkpointing.reading import CheckpointDamaged, Request, ShardFiles
from checkpointing.snapshot.protocol import KeeperClient
from checkpointing.storage import VerifyingShardReader

FETCH_CONNECT_TIMEOUT_S = 2.0
FETCH_IO_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Copy:
    """One complete copy of a rank's slot: its file under its keeper's shared-memory root."""

    path: str
    step: int
    keeper: str  # host:port of the keeper holding it
    local: bool  # under this process's shared-memory root: read it directly


class CopyFiles(ShardFiles):
    def __init__(self, shm_root: Path, index: CheckpointIndex, threads: int,
                 sources: dict[str, list[Copy]]) -> None:
        super().__init__(shm_root, index, threads)
        self.sources = sources
        self.failed: dict[Copy, str] = {}
        self.bytes_remote = 0
        self._copy = threading.local()
        self._logical = {c.path: file for file, copies in sources.items() for c in copies}
        self._clients: dict[str, KeeperClient] = {}

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for client in self._clients.values():
            client.close()

    def _fetch(self, run: list[Request], part: tuple[int, int] | None = None) -> None:
        file = run[0].box.file
        for copy in self.sources.get(file, []):
            if copy in self.failed:
                continue
            self._copy.value = copy
            try:
                return super()._fetch(run, part)
            except CheckpointDamaged as err:
                with self._lock:
                    self.failed[copy] = str(err)
        problems = "; ".join(f"{c.keeper}: {why}" for c, why in self.failed.items()
                             if self._logical[c.path] == file)
        raise CheckpointDamaged(f"{file}: no intact copy ({problems or 'none held'})")

    def _open_checked(self, file: str) -> int:
        header = self.index.files.get(self._logical.get(file, file), {}).get("header_crc32")
        fd = os.open(self.directory / file, os.O_RDONLY)
        if problem := header_problem(fd, header):
            os.close(fd)
            raise CheckpointDamaged(f"{file}: {problem}")
        return fd

    def _pread(self, file: str, buffers: list[np.ndarray], offset: int, r: Request) -> None:
        copy: Copy = self._copy.value
        if copy.local:
            return super()._pread(copy.path, buffers, offset, r)
        size = sum(b.nbytes for b in buffers)
        message = {"cmd": "read", "file": copy.path, "step": copy.step, "offset": offset,
                   "length": size}
        try:
            self._client(copy.keeper).request_into(message, [memoryview(b).cast("B")
                                                             for b in buffers])
        except (OSError, RuntimeError) as err:
            raise CheckpointDamaged(f"{copy.path}: cannot fetch tensor {r.name!r}: {err}") \
                from None
        self._count(size)
        with self._lock:
            self.bytes_remote += size

    def _client(self, address: str) -> KeeperClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = KeeperClient(
                    address, connect_timeout_s=FETCH_CONNECT_TIMEOUT_S,
                    io_timeout_s=FETCH_IO_TIMEOUT_S)
            return self._clients[address]


class CopyReader(VerifyingShardReader):
    """DCP's reader for a memory snapshot: the box logic of a disk load, bytes from copies."""

    def __init__(self, shm_root: Path, index: CheckpointIndex,
                 sources: dict[str, list[Copy]]) -> None:
        super().__init__(shm_root, index)
        self.sources = sources
        self.bytes_remote = 0
        self.failed: dict[Copy, str] = {}

    def open_files(self) -> ShardFiles:
        files = CopyFiles(self.directory, self.index, self.threads, self.sources)
        self._files = files
        return files

    def read_data(self, plan, planner):
        future = super().read_data(plan, planner)
        self.bytes_remote = self._files.bytes_remote
        self.failed = dict(self._files.failed)
        return future
