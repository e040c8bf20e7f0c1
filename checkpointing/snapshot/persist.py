"""Drain a memory snapshot to the universal on-disk format with the commit protocol.

Every node's keeper streams its ranks' slot files into one shared temp dir (a slot file already
is a safetensors shard) and writes a `node-<i>.part.json` describing them; the keeper of node 0
waits for every part, writes state.json and index.json, then commits (rename, `latest`, keep).
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
    FORMAT_VERSION,
    INDEX_FILE,
    STATE_FILE,
    CheckpointIndex,
    SavedBox,
    SavedTensor,
    block_checksums,
    dtype_from_name,
    shard_file_name,
    step_dir_name,
    write_json_durably,
)
from checkpointing.snapshot import faults
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
    """Write this node's shard files and part description for one step (all manifests agree)."""
    step = manifests[0]["step"]
    temp = temp_dir_for(root, step)
    temp.mkdir(parents=True, exist_ok=True)
    files, tensors, rank_states = {}, {}, {}
    global_state = None
    for m in sorted(manifests, key=lambda m: m["rank"]):
        name = shard_file_name(m["rank"])
        faults.maybe_pause("persist", step, f"copying {name} of step {step}", m["rank"])
        copy_durably(shm_root / m["file"], temp / name, m["size"])
        files[name] = {"size": m["size"], "header_crc32": m["header_crc32"]}
        records = m["layout"].get("records", {})
        for entry, crcs in zip(m["layout"]["entries"], m["crc32"]):
            meta = {**_tensor_meta(entry), "layout": records.get(entry["name"])}
            boxes = tensors.setdefault(entry["name"], {**meta, "boxes": []})
            boxes["boxes"].append({**entry, "file": name, "block_crc32": crcs})
        rank_states[m["rank"]] = m["rank_state"]
        if m["rank"] == 0:
            global_state = m["global_state"]
    part = {
        "step": step,
        "world_size": manifests[0]["world_size"],
        "block_size": manifests[0]["block_size"],
        "files": files,
        "tensors": tensors,
        "rank_states": rank_states,
        "global_state": global_state,
    }
    # Not fsynced: node 0 merges the parts into index.json, which is (the parts are deleted).
    write_json_atomically(temp / f"node-{node_index}.part.json", part)


def commit_when_complete(root: Path, step: int, num_nodes: int, timeout_s: float):
    """On node 0's keeper: merge the parts of every node into index.json/state.json, commit."""
    temp = temp_dir_for(root, step)
    paths = [temp / f"node-{i}.part.json" for i in range(num_nodes)]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"step {step}: no part from {missing} after {timeout_s:.0f} s")
        time.sleep(0.05)
    parts = [json.loads(p.read_text()) for p in paths]
    index, state = _merge(parts, step)
    write_json_durably(temp / STATE_FILE, state)
    write_json_durably(temp / INDEX_FILE, index.to_json())
    for path in paths:
        path.unlink()
    commit(root, temp, step)


def _merge(parts: list[dict[str, Any]], step: int) -> tuple[CheckpointIndex, dict[str, Any]]:
    files: dict[str, dict[str, int]] = {}
    boxes: dict[str, dict[tuple, SavedBox]] = {}
    meta: dict[str, dict[str, Any]] = {}
    rank_states: dict[int, Any] = {}
    global_state = None
    for part in parts:
        files.update(part["files"])
        rank_states.update({int(r): s for r, s in part["rank_states"].items()})
        global_state = part["global_state"] if part["global_state"] is not None else global_state
        for name, t in part["tensors"].items():
            meta[name] = t
            for b in t["boxes"]:
                box = SavedBox.from_json(b)
                boxes.setdefault(name, {}).setdefault(box.offsets, box)  # replicas: first wins
    world_size = parts[0]["world_size"]
    assert sorted(rank_states) == list(range(world_size)), f"ranks {sorted(rank_states)} saved"
    tensors = {
        name: SavedTensor(
            shape=tuple(meta[name]["shape"]),
            dtype=dtype_from_name(meta[name]["dtype"]),
            boxes=tuple(sorted(b.values(), key=lambda box: box.offsets)),
            layout=meta[name].get("layout"),
        )
        for name, b in boxes.items()
    }
    index = CheckpointIndex(step, world_size, parts[0]["block_size"], files, tensors)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "global_state": global_state,
        "rank_states": [rank_states[r] for r in range(world_size)],
    }
    return index, state


def _tensor_meta(entry: dict[str, Any]) -> dict[str, Any]:
    return {"shape": entry["shape"], "dtype": entry["dtype"]}


def header_crc(header: bytes) -> int:
    return block_checksums(header, len(header))[0]
