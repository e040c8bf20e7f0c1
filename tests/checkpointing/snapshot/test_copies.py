"""A memory restore reads each rank's slot from whichever real keeper process holds a complete
copy: over the keeper protocol when it is not this node's, verified against the manifest's
block checksums, and from another copy when one is damaged or its keeper is gone. A replica torn
by a sender that died mid-transfer is never listed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpointing.snapshot import SnapshotEngine
from checkpointing.snapshot.protocol import KeeperClient
from checkpointing.snapshot.restore import Holder, restore_from_memory, tag_copies
from checkpointing.snapshot.slots import SlotLayout
from tests.trainer.runs import REPO
from trainer.distributed import free_port

TENSORS = {"w": torch.randn(64, 48), "b": torch.randn(7).to(torch.bfloat16)}


class KeeperProcess:
    def __init__(self, tmp: Path, node: int, port: int, peer: int | None) -> None:
        self.shm_root, self.port = tmp / f"shm{node}", port
        cmd = [sys.executable, "-m", "checkpointing.snapshot.keeper", "--shm-root",
               str(self.shm_root), "--node-index", str(node), "--port", str(port),
               "--local-ranks", "1", "--checkpoint-dir", str(tmp / "checkpoints"), "--bind",
               "127.0.0.1"] + (["--peer", f"127.0.0.1:{peer}"] if peer else [])
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.client = KeeperClient(f"127.0.0.1:{port}")

    def listing(self) -> dict:
        reply = self.client.request({"cmd": "list"})
        return tag_copies(reply, Holder(reply["address"], reply["host"], reply["shm_root"]))

    def steps(self) -> set[int]:
        return {m["step"] for m in self.listing()["manifests"]}


@pytest.fixture
def keepers(tmp_path):
    ports = [free_port(), free_port()]
    peer = KeeperProcess(tmp_path, 1, ports[1], None)
    peer.listing()  # listening before node 0's keeper first replicates to it
    started = [KeeperProcess(tmp_path, 0, ports[0], ports[1]), peer]
    yield started
    for k in started:
        k.client.close()
        k.proc.send_signal(signal.SIGKILL)
        k.proc.wait()


def snapshot_steps(keepers, steps) -> None:
    """Node 0's only rank snapshots each step; its keeper replicates to node 1's."""
    engine = SnapshotEngine(f"127.0.0.1:{keepers[0].port}", keepers[0].shm_root, 0)
    for step in steps:
        engine.snapshot(step, TENSORS, {"step": step}, {"rank": 0})
        engine.wait_copied()
    engine.drain()
    engine.close()
    wait_until(lambda: keepers[1].steps() >= set(steps[-2:]))


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def restore(listed, elsewhere: Path, newer_than: int = 0):
    """As a rank on a third node (no copy is local) would."""
    me = Holder("127.0.0.1:1", socket.gethostname(), str(elsewhere))
    target = {n: torch.zeros_like(t) for n, t in TENSORS.items()}
    skipped: list[str] = []
    found = restore_from_memory(listed, me, target, newer_than, skipped=skipped)
    return found, target, skipped


def test_restore_fetches_remote_copies_and_retries_another(keepers, tmp_path, capfd):
    snapshot_steps(keepers, [1, 2])
    one, two = keepers[0].listing(), keepers[1].listing()
    # The listing carries each rank's layout once (not per slot) and no safetensors header.
    assert len(one["layouts"]) == 1 and "header" not in next(iter(one["layouts"].values()))
    listed = {"manifests": one["manifests"] + two["manifests"],
              "layouts": {**one["layouts"], **two["layouts"]}}
    found, target, _ = restore(listed, tmp_path / "elsewhere")
    assert found.step == 2 and found.bytes_remote > 0 and found.rank_states == [{"rank": 0}]
    assert all(torch.equal(target[n], TENSORS[n]) for n in TENSORS)

    # Damage the copy tried first (sorted by keeper address): the other one serves.
    first = min(listed["manifests"], key=lambda m: m["keeper"] if m["step"] == 2 else "~")
    entry = listed["layouts"][first["layout_key"]]["entries"][0]
    with open(Path(first["shm_root"]) / first["file"], "r+b") as f:
        f.seek(entry["byte_offset"] + 8)
        f.write(b"\xff" * 16)
    found, target, _ = restore(listed, tmp_path / "elsewhere")
    assert found.step == 2 and all(torch.equal(target[n], TENSORS[n]) for n in TENSORS)
    assert "checksum mismatch" in capfd.readouterr().err

    # The keeper tried first is gone: the other copy serves.
    (gone,) = [k for k in keepers if first["keeper"].endswith(f":{k.port}")]
    gone.proc.send_signal(signal.SIGKILL)
    gone.proc.wait()
    found, target, _ = restore(listed, tmp_path / "elsewhere")
    assert found.step == 2 and all(torch.equal(target[n], TENSORS[n]) for n in TENSORS)


def test_a_torn_replica_is_never_used(keepers, tmp_path):
    snapshot_steps(keepers, [1, 2])
    complete = [m for m in keepers[0].listing()["manifests"] if m["step"] == 2][0]
    layout = SlotLayout.build(TENSORS, set(TENSORS)).to_json()  # what the engine laid out
    # A sender dying mid-replica: step 3's manifest announced, half of its bytes sent. It
    # lands in the slot holding step 1 (the older one), as the real sender's would.
    torn = {**complete, "step": 3, "slot": 1 - complete["slot"]}
    with socket.create_connection(("127.0.0.1", keepers[1].port)) as sock:
        stream = sock.makefile("rwb")
        message = {"cmd": "replica", "node": 0, "manifest": torn, "layout": layout}
        line = json.dumps({**message, "payload": complete["size"]}).encode() + b"\n"
        stream.write(line + b"\0" * (complete["size"] // 2))
        stream.flush()
    wait_until(lambda: 1 not in keepers[1].steps())  # being overwritten
    steps = keepers[1].steps()
    assert steps == {2}, steps
    found, target, skipped = restore(keepers[1].listing(), tmp_path / "elsewhere")
    assert found.step == 2 and not skipped
    assert all(torch.equal(target[n], TENSORS[n]) for n in TENSORS)
