"""All ranks agree on which steps are snapshotted: when one rank cannot take a snapshot (its
keeper unreachable, or no free slot in time), no rank takes it. Two gloo ranks, each with its
own real keeper process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from checkpointing.snapshot import SnapshotEngine
from checkpointing.snapshot.protocol import KeeperClient
from tests.checkpointing.snapshot.test_copies import KeeperProcess
from trainer.distributed import free_port


def _rank(rank: int, init: str, ports: list[int], roots: list[str], dead: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tensors = {"w": torch.full((4, 8), float(rank))}
    engine = SnapshotEngine(f"127.0.0.1:{ports[rank]}", roots[rank], rank)
    taken = [engine.snapshot(1, tensors, {}, {})]
    engine.drain()
    if rank == 1:  # this rank's keeper is gone from now on
        engine.client = KeeperClient(f"127.0.0.1:{dead}", connect_timeout_s=0.5)
    taken.append(engine.snapshot(2, tensors, {}, {}))
    if rank == 0:
        engine.drain()
    assert taken == [True, False], (rank, taken)
    dist.destroy_process_group()


def test_a_snapshot_one_rank_cannot_take_is_taken_by_none(tmp_path):
    ports = [free_port(), free_port()]
    keepers = [KeeperProcess(tmp_path, node, ports[node], None) for node in (0, 1)]
    try:
        for k in keepers:
            k.listing()  # listening
        mp.start_processes(_rank, args=(f"file://{tmp_path / 'init'}", ports,
                                        [str(k.shm_root) for k in keepers], free_port()),
                           nprocs=2, start_method="spawn")
        assert keepers[0].steps() == {1}  # rank 0 did not snapshot step 2 alone
    finally:
        for k in keepers:
            k.client.close()
            k.proc.kill()
            k.proc.wait()
