"""Parallel verified reads: bitwise the same as serial reads, damage still caught, old
checkpoints still readable, and tensor-parallel column loads read only their share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from checkpointing import CheckpointManager, model_tensors, optimizer_tensors, reading
from checkpointing.format import CheckpointDamaged, read_index
from checkpointing.reading import Request, ShardFiles
from tests.checkpointing.helpers import downgrade_to_format_v1
from tests.distributed import run_distributed

BLOCK = 256


def sample_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(37, 53, generator=gen),
        "experts": torch.randn(5, 7, 11, generator=gen).to(torch.bfloat16),
        "ids": torch.randint(0, 1000, (301,), generator=gen),
        "step": torch.tensor(7.0),
        "mask": torch.rand(9, 9, generator=gen) > 0.5,
    }


REGIONS = [  # (name, offsets, lengths): row slices, column slices (tiles), whole boxes
    ("w", (0, 0), (37, 53)),
    ("w", (5, 0), (20, 53)),
    ("w", (0, 27), (37, 26)),
    ("w", (3, 10), (30, 20)),
    ("experts", (1, 2, 3), (3, 4, 5)),
    ("ids", (17,), (200,)),
    ("step", (), ()),
    ("mask", (0, 4), (9, 5)),
]


def read_all(path: Path, threads: int) -> list[torch.Tensor]:
    index = read_index(path)
    out = []
    with ShardFiles(path, index, threads) as files:
        requests = []
        for name, offsets, lengths in REGIONS:
            box = index.tensors[name].boxes[0]
            target = torch.empty(lengths, dtype=index.tensors[name].dtype)
            requests.append(Request(name, box, offsets, lengths, target))
            out.append(target)
        files.read_into(requests)
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunking and coalescing thresholds small enough for a test-sized state."""
    monkeypatch.setattr(reading, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(reading, "COALESCE_BYTES", 4096)
    monkeypatch.setattr(reading, "BATCH_BYTES", 8192)


def test_parallel_reads_equal_serial_reads_bitwise(tmp_path, small_chunks):
    state = sample_state()
    path = CheckpointManager(tmp_path, block_size=BLOCK).save(1, state)
    assert read_index(path).tensors["w"].boxes[0].tiles is not None  # column reads use tiles
    serial, parallel = read_all(path, 1), read_all(path, 4)
    for (name, offsets, lengths), a, b in zip(REGIONS, serial, parallel):
        want = state[name]
        for dim, (offset, length) in enumerate(zip(offsets, lengths)):
            want = want.narrow(dim, offset, length)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
        assert torch.equal(b, want), name


def flip_byte(path: Path, name: str, row: int, col: int) -> None:
    box = read_index(path).tensors[name].boxes[0]
    at = box.byte_offset + (row * box.sizes[1] + col) * 4
    with open(path / box.file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def test_flipped_byte_is_caught_on_the_parallel_path(tmp_path, small_chunks):
    path = CheckpointManager(tmp_path, block_size=BLOCK).save(1, sample_state())
    flip_byte(path, "w", 30, 40)  # inside the column slice [27, 53) and the rows [5, 25)
    with pytest.raises(ValueError, match="checksum mismatch in tile .* tensor 'w'"):
        with ShardFiles(path, read_index(path), 4) as files:
            files.read_region("w", (0, 0), (0, 27), (37, 26))
    manager = CheckpointManager(tmp_path, block_size=BLOCK, read_threads=4)
    with pytest.raises(ValueError, match="checksum mismatch in block .* tensor 'w'"):
        manager.load(path, sample_state())
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint"):
        manager.load_latest(sample_state())


def test_format_version_1_checkpoints_still_load(tmp_path):
    """A version-1 index (zlib crc32 blocks, no tiles), as earlier Perennial wrote it."""
    state = sample_state()
    path = CheckpointManager(tmp_path, block_size=BLOCK).save(1, state)
    downgrade_to_format_v1(path)
    loaded = {k: torch.zeros_like(v) for k, v in sample_state().items()}
    CheckpointManager(tmp_path, read_threads=3).load(path, loaded)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [t.equal(read_all(path, 4)[i]) for i, t in enumerate(read_all(path, 1))] == [True] * 8


WIDTH, DEPTH = 301, 2  # odd: shards are uneven


def mlp_state(layout: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if layout == "tp":
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    else:
        for layer in model:
            fully_shard(layer, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters())
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)
    optim.step()
    tensors = model_tensors(model)
    tensors.update(optimizer_tensors(model, optim)[0])
    return tensors


def tp_load_bytes(root: str) -> tuple[int, int, bool]:
    saved = mlp_state("fsdp")
    manager = CheckpointManager(root, block_size=16 * 1024)
    manager.save(1, saved)
    tensors = mlp_state("tp")
    with torch.no_grad():
        for value in tensors.values():
            value.zero_()
    result = manager.load_latest(tensors)
    share = sum(
        (t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors.values()
    )
    expect = mlp_state("tp")  # same seed and step: the state that was saved, laid out for TP
    equal = all(
        torch.equal(tensors[k].full_tensor(), expect[k].full_tensor())
        if hasattr(tensors[k], "full_tensor")
        else torch.equal(tensors[k], expect[k])
        for k in tensors
    )
    return result.bytes_read, share, equal


def test_tensor_parallel_column_loads_read_only_their_share(tmp_path):
    """FSDP2 saves row boxes; TP RowwiseParallel (Shard(1)) ranks read their columns only."""
    for bytes_read, share, equal in run_distributed(tp_load_bytes, 2, args=(str(tmp_path),)):
        assert equal
        assert 0 < bytes_read <= share, (bytes_read, share)
