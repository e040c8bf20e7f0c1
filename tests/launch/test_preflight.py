"""Launch mistakes are caught before any worker starts, each on one line that names it: the
rendezvous port taken, a process count that does not fit parallel.* and the batch sizes, an
unwritable run.dir, and /dev/shm too small for the memory snapshots."""

from __future__ import annotations

import socket

import pytest
import torch

from checkpointing import CheckpointManager
from launch.preflight import (
    check_data_files,
    check_rendezvous_port,
    check_resume_model,
    check_run_dir_writable,
    check_shm_space,
    check_world_size,
    snapshot_bytes_per_node,
)
from tests.tmpfs import mounted_tmpfs
from tests.trainer.runs import perennial, tiny_job
from trainer.config_loader import load_config, to_yaml
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
        check_world_size(load_config(None, []), 5, 2)
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
    with mounted_tmpfs(tmp_path / "shm", "64k") as shm:
        cfg = load_config(None, [f"run.dir={tmp_path}", "checkpoint.interval=1"])
        with pytest.raises(ValueError) as err:
            check_shm_space(cfg, 1, 1, shm_dir=shm)
    assert f"{shm} has 64 KiB free" in str(err.value) and "0.00 GiB" not in str(err.value)


def test_cli_shm_too_small(tmp_path):
    proc = perennial("train", *tiny_job(tmp_path, tmp_path), *HUGE_MODEL,
                     "checkpoint.interval=1", "--nproc", "2", check=False)
    line = one_line_error(proc)
    assert "/dev/shm" in line and "checkpoint.interval=0" in line


def test_init_from_must_be_a_checkpoint_run_dir_or_hf_dir(tmp_path):
    (tmp_path / "notes").mkdir()
    proc = perennial("train", *tiny_job(tmp_path / "run", tmp_path / "cache"),
                     f"init.from={tmp_path / 'notes'}", check=False)
    line = one_line_error(proc)
    assert "notes is not a checkpoint, a run directory with a committed checkpoint, a torch " \
           "DCP checkpoint, or a Hugging Face model directory" in line


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n\n", "holds no records"),
    ('{"body": "words"}\n', "no column 'text' in .* \\(columns: \\['body'\\]\\); set "
                            "data.sources\\[0\\].text_column"),
])
def test_data_files_are_checked_before_any_process(tmp_path, content, message):
    data = tmp_path / "docs.jsonl"
    data.write_text(content)
    cfg = load_config(None, [f"data.sources=[{{name: docs, path: '{data}'}}]"])
    with pytest.raises(ValueError, match=message):
        check_data_files(cfg.data)


def test_parquet_columns_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a b c"]}), tmp_path / "d.parquet")
    cfg = load_config(None, [f"data.sources=[{{name: d, path: '{tmp_path / 'd.parquet'}'}}]"])
    with pytest.raises(ValueError, match="no column 'text'.*'content'"):
        check_data_files(cfg.data)
    source = f"{{name: d, path: '{tmp_path / 'd.parquet'}', text_column: content}}"
    check_data_files(load_config(None, [f"data.sources=[{source}]"]).data)


def test_a_resume_with_another_model_is_refused_on_one_line(tmp_path):
    saved = load_config(None, [f"run.dir={tmp_path}", "model.dim=64"])
    CheckpointManager(saved.checkpoint.dir).save(
        3, {"model.w": torch.zeros(2)}, {"step": 3, "config": to_yaml(saved)})
    check_resume_model(load_config(None, [f"run.dir={tmp_path}", "model.dim=64"]))
    changed = load_config(None, [f"run.dir={tmp_path}", "model.dim=128", "model.moe.top_k=1"])
    with pytest.raises(ValueError, match=r"resumes .*step-00000003 \(step 3\), whose model "
                       r"differs: model.dim is 64 there, 128 now; model.moe.top_k is 2 there, "
                       r"1 now\. Drop those"):
        check_resume_model(changed)
