"""The keeper's bookkeeping in one process: a keeper killed between acknowledging a copy and
checksumming it, or in the middle of a persist, leaves work its restarted successor finishes."""

from __future__ import annotations

import socket
import threading
import time

import torch

from checkpointing import CheckpointManager, find_loadable
from checkpointing.snapshot.keeper import Keeper, parse_args
from checkpointing.snapshot.slots import MappedSlot, SlotLayout


def keeper_over(tmp_path, start_workers: bool, *extra: str) -> Keeper:
    keeper = Keeper(parse_args([
        "--shm-root", str(tmp_path / "shm"), "--port", "0", "--local-ranks", "1",
        "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra]))
    if start_workers:  # a killed keeper never ran the work it queued
        for tasks in (keeper.tasks, keeper.persists, keeper.replicas):
            threading.Thread(target=keeper.work, args=(tasks,), daemon=True).start()
    return keeper


def snapshot_into(keeper: Keeper, step: int, tensors: dict[str, torch.Tensor], persist: bool):
    """What a worker does: register, begin, copy into the slot file, report done."""
    layout = SlotLayout.build(tensors, set(tensors))
    (file, _) = keeper.handle({"cmd": "register", "rank": 0, "world_size": 1,
                               "layout": layout.to_json()}, None, None)["files"]
    slot = keeper.handle({"cmd": "begin", "rank": 0, "step": step, "world_size": 1},
                         None, None)["slot"]
    mapped = MappedSlot(keeper.shm_root / keeper.store.relative(0, slot), layout)
    for name, view in mapped.views().items():
        view.copy_(tensors[name])
    mapped.close()
    keeper.handle({"cmd": "done", "rank": 0, "slot": slot, "step": step, "persist": persist,
                   "global_state": {"step": step}, "rank_state": {}}, None, None)
    return file


def test_restarted_keeper_checksums_what_its_predecessor_acknowledged(tmp_path):
    tensors = {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    dead = keeper_over(tmp_path, start_workers=False)
    snapshot_into(dead, 6, tensors, persist=False)
    assert dead.store.complete_manifests() == []  # acknowledged, never checksummed

    successor = keeper_over(tmp_path, start_workers=True)
    successor.finish_adopted_work()
    (manifest,) = successor.store.complete_manifests()
    assert manifest["step"] == 6 and len(manifest["crc32"]) == 2
    assert not (tmp_path / "checkpoints").exists()  # not due to persist: nothing written


def test_restarted_keeper_resumes_an_interrupted_persist(tmp_path):
    tensors = {"w": torch.randn(4, 8)}
    dead = keeper_over(tmp_path, start_workers=False)
    snapshot_into(dead, 4, tensors, persist=True)

    successor = keeper_over(tmp_path, start_workers=True)
    successor.finish_adopted_work()
    successor.join_background_work()
    (candidate,) = find_loadable(tmp_path / "checkpoints")
    assert candidate.step == 4 and candidate.problem is None
    loaded = {"w": torch.zeros(4, 8)}
    CheckpointManager(tmp_path / "checkpoints").load_latest(loaded)
    assert torch.equal(loaded["w"], tensors["w"])


def test_a_hung_peer_delays_no_checksum(tmp_path):
    """Replicas go out from their own thread: a peer that accepts and never answers holds up
    neither the next checksum nor the slot beyond the peer timeout."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        keeper = keeper_over(tmp_path, True, "--peer", f"127.0.0.1:{hung.getsockname()[1]}")
        tensors = {"w": torch.randn(4, 8)}
        for step in (1, 2):
            snapshot_into(keeper, step, tensors, persist=False)
        deadline = time.monotonic() + 10
        while len(keeper.store.complete_manifests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(m["step"] for m in keeper.store.complete_manifests()) == [1, 2]
