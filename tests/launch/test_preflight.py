"""Launch mistakes are caught before any worker starts, each on one line that names it: the
rendezvous port taken, a process count that does not fit parallel.* and the batch sizes, an
unwritable run.dir, and /dev/shm too small for the memory snapshots."""

from __future__ import annotations

import socket
import subprocess

import pytest

from launch.preflight import (
    check_rendezvous_port,
    check_run_dir_writable,
    check_shm_space,
    check_world_size,
    snapshot_bytes_per_node,
)
from tests.trainer.runs import perennial, tiny_job
from trainer.config_loader import load_config
from trainer.distributed import free_port

# Roughly 52 billion parameters: its snapshots cannot fit any machine's /dev/shm.
HUGE_MODEL = ["model.dim=8192", "model.n_layers=64", "model.n_heads=64", "model.n_kv_heads=8"]


def one_line_error(proc) -> str:
    """The CLI's whole answer to a launch mistake: exit 2, one `error:` line, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def listening_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_rendezvous_port_in_use(listening_port):
    with pytest.raises(ValueError, match=f"rendezvous port {listening_port} .* already in use"):
        check_rendezvous_port(f"127.0.0.1:{listening_port}")


def test_free_rendezvous_port_passes():
    check_rendezvous_port(f"localhost:{free_port()}")


@pytest.mark.parametrize("endpoint", ["nohost", "host:", ":29500", "host:99999"])
def test_malformed_endpoint(endpoint):
    with pytest.raises(ValueError, match="--rdzv-endpoint must be HOST:PORT"):
        check_rendezvous_port(endpoint)


def test_cli_port_in_use(tmp_path, listening_port):
    proc = perennial("train", *tiny_job(tmp_path / "run", tmp_path / "cache"), "--nproc", "2",
                     "--rdzv-endpoint", f"127.0.0.1:{listening_port}", check=False)
    assert f"rendezvous port {listening_port}" in one_line_error(proc)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_world_size_names_the_processes_and_the_key():
    cfg = load_config(None, ["parallel.tp=2"])
    with pytest.raises(ValueError, match=r"3 process\(es\) per node × 1 node.*parallel.tp"):
        check_world_size(cfg, 3, 1)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        check_world_size(load_config(None, []), 3, 2)
    check_world_size(cfg, 2, 2)


def test_cli_nproc_does_not_fit_tensor_parallel(tmp_path):
    proc = perennial("train", *tiny_job(tmp_path, tmp_path), "parallel.tp=2", "--nproc", "3",
                     check=False)
    assert "parallel.tp (2)" in one_line_error(proc)


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"run.dir {blocker}/run is not writable"):
        check_run_dir_writable(blocker / "run")
    check_run_dir_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


def test_cli_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = perennial("train", *tiny_job(blocker / "run", tmp_path), "--nproc", "2", check=False)
    assert f"run.dir {blocker}/run is not writable" in one_line_error(proc)


def test_snapshot_estimate_follows_the_layout():
    fsdp = load_config(None, ["checkpoint.interval=1"])
    ddp = load_config(None, ["checkpoint.interval=1", "parallel.strategy=ddp"])
    replicated = load_config(None, ["checkpoint.interval=1", "checkpoint.replicas=1"])
    # FSDP shards the state over the world; DDP keeps a full copy per rank.
    assert snapshot_bytes_per_node(ddp, 4, 8) == 8 * snapshot_bytes_per_node(fsdp, 4, 8)
    assert snapshot_bytes_per_node(replicated, 4, 8) == 2 * snapshot_bytes_per_node(fsdp, 4, 8)


def test_shm_too_small(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "checkpoint.interval=1", *HUGE_MODEL])
    with pytest.raises(ValueError, match="/dev/shm has .* [GMK]iB free but checkpoint.interval=1"):
        check_shm_space(cfg, 8, 8)
    check_shm_space(load_config(None, [f"run.dir={tmp_path}", "checkpoint.interval=1"]), 2, 2)


def test_small_shm_sizes_are_readable(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(shm)]).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        cfg = load_config(None, [f"run.dir={tmp_path}", "checkpoint.interval=1"])
        with pytest.raises(ValueError) as err:
            check_shm_space(cfg, 1, 1, shm_dir=shm)
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False)
    assert f"{shm} has 64 KiB free" in str(err.value) and "0.00 GiB" not in str(err.value)


def test_cli_shm_too_small(tmp_path):
    proc = perennial("train", *tiny_job(tmp_path, tmp_path), *HUGE_MODEL,
                     "checkpoint.interval=1", "--nproc", "2", check=False)
    line = one_line_error(proc)
    assert "/dev/shm" in line and "checkpoint.interval=0" in line
