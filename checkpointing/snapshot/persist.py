"""Drain a memory snapshot to the universal on-disk format with the commit protocol.

Every node's keeper streams its ranks' slot files into one shared temp dir (a slot file already
is a safetensors shard) and writes a `node-<i>.part.json` describing them; the keeper holding rank 0
waits for every part of the world that took the step (the world may differ from one step to the
next), writes state.json and index.json, then commits (rename, `latest`, keep).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from checkpointing.commit import TMP_PREFIX, commit
from checkpointing.format import (
    INDEX_FILE,
    STATE_FILE,
    block_checksums,
    shard_file_name,
    step_dir_name,
    write_json_durably,
)
from checkpointing.snapshot import faults
from checkpointing.snapshot.index import index_from_manifests, state_from_manifests
from checkpointing.snapshot.slots import write_json_atomically

COPY_CHUNK = 64 << 20


def temp_dir_for(root: Path, step: int) -> Path:
    """One name every node's keeper agrees on without talking."""
    return root / f"{TMP_PREFIX}{step_dir_name(step)}-keeper"


def copy_durably(source: Path, target: Path, size: int) -> None:
    """Sequential copy, then fsync: the bytes are already in memory. sendfile(2) copies inside
    the kernel (no round trip through a user buffer); a buffered loop where it is refused."""
    with open(source, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
        try:
            done = _send(src, dst, size)
        except OSError as err:
            if err.errno not in SENDFILE_UNSUPPORTED:
                raise
            done = 0
        if done < size:
            src.seek(done)
            dst.seek(done)
            _copy_buffered(src, dst, source, done, size)
        os.fsync(dst.fileno())


SENDFILE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _send(src, dst, size: int) -> int:
    done = 0
    while done < size:
        count = os.sendfile(dst.fileno(), src.fileno(), done, min(size - done, COPY_CHUNK))
        if not count:
            break  # source shorter than expected: the buffered loop says so
        done += count
    return done


def _copy_buffered(src, dst, source: Path, done: int, size: int) -> None:
    buffer = memoryview(bytearray(min(COPY_CHUNK, max(size - done, 1))))
    while done < size:
        count = src.readinto(buffer[: min(len(buffer), size - done)])
        assert count, f"{source} ended after {done} of {size} bytes"
        view, written = buffer[:count], 0
        while written < count:
            written += dst.write(view[written:])
        done += count


def write_node_part(root: Path, node_index: int, manifests: list[dict[str, Any]], shm_root: Path):
    """Write this node's shard files and part description (its ranks' manifests, without the
    safetensors header the shard files already hold) for one step."""
    step = manifests[0]["step"]
    temp = temp_dir_for(root, step)
    temp.mkdir(parents=True, exist_ok=True)
    described = []
    for m in sorted(manifests, key=lambda m: m["rank"]):
        name = shard_file_name(m["rank"])
        faults.maybe_pause("persist", step, f"copying {name} of step {step}", m["rank"])
        copy_durably(shm_root / m["file"], temp / name, m["size"])
        layout = {k: v for k, v in m["layout"].items() if k != "header"}
        described.append({**m, "layout": layout})
    # Not fsynced: the committing keeper merges the parts into index.json, which is.
    write_json_atomically(temp / f"node-{node_index}.part.json",
                          {"step": step, "manifests": described})


def commit_when_complete(root: Path, step: int, nodes: list[int], timeout_s: float):
    """On the keeper of the node holding rank 0: merge the parts of every node of the world
    that took `step` into index.json/state.json (the index a memory restore builds), commit."""
    temp = temp_dir_for(root, step)
    paths = [temp / f"node-{i}.part.json" for i in nodes]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"step {step}: no part from {missing} after {timeout_s:.0f} s")
        time.sleep(0.05)
    manifests = [m for p in paths for m in json.loads(p.read_text())["manifests"]]
    state = state_from_manifests(manifests, step)
    index = index_from_manifests(manifests, step)
    write_json_durably(temp / STATE_FILE, state)
    write_json_durably(temp / INDEX_FILE, index.to_json())
    for path in paths:
        path.unlink()
    commit(root, temp, step)


def header_crc(header: bytes) -> int:
    return block_checksums(header, len(header))[0]
