"""Damage and crashes: fall back to the previous good checkpoint, never load a bad one."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from checkpointing import CheckpointManager, find_loadable
from checkpointing.cli import main as ckpt
from tests.checkpointing.helpers import downgrade_to_format_v1
from tests.distributed import run_distributed
from tests.tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parents[2]


def tensors_for(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {"model.w": torch.randn(41, 17, generator=gen), "model.b": torch.randn(5, generator=gen)}


def save_two(root: Path) -> CheckpointManager:
    mgr = CheckpointManager(root, block_size=256)
    for step in (1, 2):
        mgr.save(step, tensors_for(step), {"step": step})
    return mgr


def assert_falls_back(mgr: CheckpointManager, *reason_words: str) -> None:
    loaded = {name: torch.zeros_like(t) for name, t in tensors_for(1).items()}
    result = mgr.load_latest(loaded)
    assert result.step == 1 and result.global_state == {"step": 1}
    assert [path.name for path, _ in result.skipped] == ["step-00000002"]
    for word in reason_words:
        assert word in result.skipped[0][1], result.skipped[0][1]
    for name, value in tensors_for(1).items():
        assert torch.equal(loaded[name], value), name


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_shard(tmp_path, capsys):
    mgr = save_two(tmp_path)
    shard = tmp_path / "step-00000002" / "shard-00000.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    assert_falls_back(mgr, "shard-00000.safetensors", "truncated")
    assert find_loadable(tmp_path)[0].problem is not None
    assert ckpt(["verify", str(tmp_path / "step-00000002")]) == 1
    out = capsys.readouterr().out
    assert "shard-00000.safetensors" in out and "'model.w'" in out


def test_flipped_byte(tmp_path, capsys):
    mgr = save_two(tmp_path)
    shard = tmp_path / "step-00000002" / "shard-00000.safetensors"
    flip_byte(shard, shard.stat().st_size - 50)  # inside model.w's data, the last tensor
    assert find_loadable(tmp_path)[0].problem is None  # structurally fine, caught on read
    assert_falls_back(mgr, "checksum mismatch", "shard-00000.safetensors", "model.w")
    with pytest.raises(ValueError, match="checksum mismatch"):
        mgr.load(tmp_path / "step-00000002", tensors_for(2))
    assert ckpt(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "shard-00000.safetensors" in out and "'model.w'" in out
    assert ckpt(["verify", str(tmp_path / "step-00000001")]) == 0


def test_deleted_index(tmp_path, capsys):
    mgr = save_two(tmp_path)
    (tmp_path / "step-00000002" / "index.json").unlink()
    assert_falls_back(mgr, "index.json is missing")
    assert ckpt(["verify", str(tmp_path)]) == 1
    assert "index.json" in capsys.readouterr().out


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    root = tmp_path / "ckpt"
    mgr = save_two(root)
    mgr.save(3, tensors_for(3), {"step": 3})
    (root / "step-00000003" / "index.json").write_bytes(payload)
    shard = root / "step-00000002" / "shard-00000.safetensors"
    shard.write_bytes(payload + b"\0" * (shard.stat().st_size - len(payload)))
    (root / "step-00000001" / ".metadata").write_bytes(payload)  # what DCP itself would read
    loaded = {name: torch.zeros_like(t) for name, t in tensors_for(1).items()}
    result = mgr.load_latest(loaded)
    assert result.step == 1 and len(result.skipped) == 2
    assert "index.json is not valid JSON" in result.skipped[0][1]
    assert "checksum mismatch" in result.skipped[1][1]
    assert ckpt(["inspect", str(root / "step-00000003")]) == 2
    assert not marker.exists()


_WRITER = """
import os, sys, time, torch
from checkpointing import CheckpointManager
root, signal_file, stage = sys.argv[1:]
mgr = CheckpointManager(root)
mgr.save(1, {"model.w": torch.ones(3)})
real = {"fsync": os.fsync, "rename": os.rename}
def stall(*args):
    open(signal_file, "w").close()
    time.sleep(600)
setattr(os, stage, stall)  # the crash point: writing shards (fsync) or committing (rename)
mgr.save(2, {"model.w": torch.zeros(3), "model.big": torch.randn(2_000_000)})
"""


@pytest.mark.parametrize("stage", ["fsync", "rename"])
def test_writer_killed_mid_commit(tmp_path, stage):
    root, signal_file = tmp_path / "ckpt", tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), str(signal_file), stage], env=env
    )
    deadline = time.monotonic() + 120
    while not signal_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert signal_file.exists(), "writer never reached the crash point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert any(p.name.startswith(".tmp-step-00000002") for p in root.iterdir())
    loaded = {"model.w": torch.zeros(3)}
    mgr = CheckpointManager(root)
    result = mgr.load_latest(loaded)
    assert result.step == 1 and not result.skipped and torch.equal(loaded["model.w"], torch.ones(3))
    mgr.save(3, {"model.w": torch.ones(3)})
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def _flip_on_rank1_rank(root: Path) -> dict:
    """FSDP-style sharded tensors on 2 ranks; damage a block only rank 1 reads."""
    mesh = init_device_mesh("cpu", (2,))
    mgr = CheckpointManager(root, block_size=256)
    for step in (1, 2):
        full = tensors_for(step)
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        mgr.save(step, sharded, {"step": step})
    if dist.get_rank() == 0:
        shard = root / "step-00000002" / "shard-00001.safetensors"
        flip_byte(shard, shard.stat().st_size - 10)
    dist.barrier()
    target = {
        k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)])
        for k, v in tensors_for(1).items()
    }
    result = mgr.load_latest(target)
    for name, value in tensors_for(1).items():
        assert isinstance(target[name], DTensor)
        assert torch.equal(target[name].full_tensor(), value), name
    return {"step": result.step, "skipped": [(p.name, why) for p, why in result.skipped]}


def test_any_rank_damage_makes_all_ranks_fall_back(tmp_path):
    results = run_distributed(_flip_on_rank1_rank, 2, args=(tmp_path,))
    for result in results:
        assert result["step"] == 1
        [(name, why)] = result["skipped"]
        assert name == "step-00000002"
        assert "checksum mismatch" in why and "shard-00001.safetensors" in why and "rank 1" in why


def replace_once(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) >= 1, (old, data[:200])
    path.write_bytes(data.replace(old, new, 1))


@pytest.mark.parametrize("name,old,new", [
    # one bit each: valid JSON, wrong content (issue 18 #6)
    ("state.json", b'"global_state": {\n  "step": 2', b'"global_state": {\n  "step": 3'),
    ("index.json", b'"world_size": 1', b'"world_size": 3'),
])
def test_flipped_bit_in_metadata(tmp_path, capsys, name, old, new):
    mgr = save_two(tmp_path)
    replace_once(tmp_path / "step-00000002" / name, old, new)
    assert_falls_back(mgr, name, "checksum mismatch")
    assert ckpt(["verify", str(tmp_path)]) == 1
    assert f"{name}: checksum mismatch" in capsys.readouterr().out


def test_flipped_byte_in_safetensors_header_fails_load_and_verify_alike(tmp_path, capsys):
    mgr = save_two(tmp_path)
    shard = tmp_path / "step-00000002" / "shard-00000.safetensors"
    replace_once(shard, b'"writer":"perennial"', b'"writer":"perenniaL"')
    assert_falls_back(mgr, "shard-00000.safetensors", "safetensors header")
    assert ckpt(["verify", str(tmp_path)]) == 1
    assert "checksum mismatch in the safetensors header" in capsys.readouterr().out


def test_truncated_state_json_fails_verify_as_it_fails_load(tmp_path, capsys):
    mgr = save_two(tmp_path)
    state = tmp_path / "step-00000002" / "state.json"
    os.truncate(state, state.stat().st_size // 2)
    assert_falls_back(mgr, "state.json")
    assert ckpt(["verify", str(tmp_path)]) == 1
    assert "state.json is not valid JSON" in capsys.readouterr().out


def test_verify_prints_one_line_per_damaged_file_and_counts(tmp_path, capsys):
    save_two(tmp_path)
    shard = tmp_path / "step-00000002" / "shard-00000.safetensors"
    for offset in (shard.stat().st_size - 10, shard.stat().st_size - 2000):  # both tensors
        flip_byte(shard, offset)
    assert ckpt(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, lines  # BAD <path>:, the shard's line, the counts
    assert "shard-00000.safetensors" in lines[1] and "'model.b', 'model.w'" in lines[1]
    assert lines[2] == "1 damaged file(s); 2 of 2 tensor shard(s) in 1 file(s) unreadable"


def test_format_v1_checkpoints_without_metadata_checksums_still_load(tmp_path, capsys):
    mgr = save_two(tmp_path)
    downgrade_to_format_v1(tmp_path / "step-00000002")
    loaded = {name: torch.zeros_like(t) for name, t in tensors_for(2).items()}
    result = mgr.load_latest(loaded)
    assert result.step == 2 and not result.skipped
    assert ckpt(["verify", str(tmp_path)]) == 0


def test_failed_save_on_a_full_disk_removes_its_temp_dir(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        mgr = CheckpointManager(disk / "ckpt")
        with pytest.raises((OSError, RuntimeError), match="No space left"):
            mgr.save(1, {"model.w": torch.randn(512, 1024)})  # 2 MiB on a 1 MiB disk
        assert not [p.name for p in (disk / "ckpt").iterdir()], "the temp dir holds the space"
        mgr.save(2, tensors_for(2))  # the space is back
        assert [c.step for c in find_loadable(disk / "ckpt")] == [2]
