"""Operator mistakes and sick disks (issue 18), on real runs with real signals and real files:
two runs on one directory, a recreated directory with stale memory, a killed launcher, a slow
persist, a full disk, flipped bits in a memory slot, too little shared memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.keepers import shm_root_for
from tests.tmpfs import mounted_tmpfs
from tests.trainer.runs import REPO, metrics, perennial, tiny_job
from tests.trainer.test_fault_injection import JOB, Run, no_leftover_runs, resumes  # noqa: F401

pytestmark = pytest.mark.slow
IN_PROCESS = ("--nproc", "1", "--max-restarts", "0")  # no torchrun: the cheapest real run
UNDER_TORCHRUN = ("--nproc", "1", "--max-restarts", "2")


def pause(tmp_path: Path, spec: str) -> dict[str, str]:
    """PERENNIAL_FAULT_PAUSE entries `point:action`, each with its own marker file."""
    entries = [f"{s}:{tmp_path / f'fault-{i}'}" for i, s in enumerate(spec.split(";"))]
    return {"PERENNIAL_FAULT_PAUSE": ";".join(entries)}


def kill_now(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def test_second_run_on_a_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    first = Run(run_dir, data_cache, *IN_PROCESS, env=pause(tmp_path, "step@2:120"))
    first.wait_for(r"paused in step", timeout=300)
    second = perennial("train", *tiny_job(run_dir, data_cache, *JOB), check=False)
    err = second.stderr.strip()
    assert second.returncode == 2 and err.count("\n") == 0, err
    assert "in use by another run" in err and f"pid {first.proc.pid}" in err, err
    assert socket.gethostname() in err and "started" in err
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    bare = subprocess.run([sys.executable, "-m", "trainer", *tiny_job(run_dir, data_cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "in use by another run" in bare.stderr, bare.stderr

    kill_now([*psutil.Process(first.proc.pid).children(recursive=True),
              psutil.Process(first.proc.pid)])
    log = Run(run_dir, data_cache, *IN_PROCESS).finish()
    assert "taking over the stale lock" in log and f"pid {first.proc.pid}" in log, log


def test_recreated_run_dir_never_adopts_the_old_runs_memory(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    first = Run(run_dir, data_cache, *IN_PROCESS, "checkpoint.persist_interval=8",
                env=pause(tmp_path, "step@5:120"))
    first.wait_for(r"paused in step", timeout=300)
    old_memory = shm_root_for(run_dir)
    # The whole job SIGKILLed at once (keeper first): nothing persists or frees the memory.
    kill_now([*first.processes("snapshot.keeper"), psutil.Process(first.proc.pid)])
    assert list(old_memory.glob("node0/rank-00000.slot*.json")), "no memory was left behind"
    shutil.rmtree(run_dir)

    log = Run(run_dir, data_cache, *IN_PROCESS, "optim.lr=1e-3").finish()
    assert "resumed from" not in log, log
    assert "removed memory snapshots another run left" in log and not old_memory.exists(), log


def test_killed_launcher_leaves_no_process_behind(tmp_path, data_cache):
    run = Run(tmp_path / "run", data_cache, *UNDER_TORCHRUN, env=pause(tmp_path, "step@3:120"))
    run.wait_for(r"paused in step", timeout=300)
    tree = psutil.Process(run.proc.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in tree]
    for parts in (("launch.torchrun", "torch.distributed.run"), ("-m trainer",),
                  ("snapshot.keeper",)):
        assert any(part in c for c in commands for part in parts), commands
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    leftover = [" ".join(p.cmdline()) for p in alive]
    kill_now(alive)
    assert not leftover, leftover


def test_slow_persist_skips_no_snapshot(tmp_path, data_cache):
    # Persisting step 2 takes 8 s (the #0 filter must match in the keeper); meanwhile both
    # slots get pinned (step 2 persisting, step 4 queued to persist) and the rank kills itself
    # at step 7: at most the step in flight is lost, nothing is skipped.
    env = pause(tmp_path, "persist#0:8;step@7:kill")
    run = Run(tmp_path / "run", data_cache, *UNDER_TORCHRUN, "checkpoint.interval=1",
              "checkpoint.persist_interval=2", env=env)
    log = run.finish()
    assert "paused in persist" in log and "skipped" not in log, log
    [(source, step)] = resumes(log)
    assert source.startswith("memory:") and step >= 6, log
    records = metrics(tmp_path / "run")
    assert all(r["snapshots_skipped"] == 0 for r in records)
    assert any(r["snapshot_wait_s"] > 1 for r in records), records


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for the run and two or three tiny checkpoints, no more."""
    with mounted_tmpfs(tmp_path / "disk", "16m") as mount:
        yield mount


def fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * (1 << 16))


def test_full_disk_training_goes_on_and_persisting_resumes(tmp_path, data_cache, small_disk):
    run_dir = small_disk / "run"
    run = Run(run_dir, data_cache, *IN_PROCESS, "checkpoint.interval=1", "train.max_steps=12",
              "schedule.total_steps=12", "checkpoint.persist_interval=2",
              env=pause(tmp_path, "step@3:5;step@8:10"))
    run.wait_for(r"paused in step \(rank 0 after step 3\)")
    fill(small_disk / "filler")
    run.wait_for(r"paused in step \(rank 0 after step 8\)")
    assert re.search(r"persist of step [46] failed.*No space left", run.log), run.log
    assert "training goes on" in run.log and "disk at step 2" in run.log, run.log
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "temp dirs hold the space"
    (small_disk / "filler").unlink()
    log = run.finish()
    assert "persisting to disk again" in log, log
    assert (run_dir / "checkpoints" / "step-00000012").is_dir()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 13))


def test_full_disk_without_the_memory_tier_training_goes_on(tmp_path, data_cache, small_disk):
    run_dir = small_disk / "run"
    run = Run(run_dir, data_cache, *IN_PROCESS, "checkpoint.interval=0", "train.max_steps=40",
              "schedule.total_steps=40", "checkpoint.persist_interval=4")
    run.wait_for_step(1)
    fill(small_disk / "filler")
    run.wait_for(r"warning: checkpoint of step \d+ failed .*No space left")
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "temp dirs hold the space"
    (small_disk / "filler").unlink()
    run.finish()
    assert (run_dir / "checkpoints" / "step-00000040").is_dir()


def complete_slot(node: Path, step: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in node.glob("rank-00000.slot?.json"):
            with contextlib.suppress(OSError, ValueError):
                manifest = json.loads(path.read_text())
                if manifest["state"] == "complete" and manifest["step"] == step:
                    return manifest
        time.sleep(0.05)
    raise AssertionError(f"no complete slot of step {step} in {node}")


def test_flipped_bits_in_a_memory_slot_are_named_and_skipped(tmp_path, data_cache):
    run = Run(tmp_path / "run", data_cache, *UNDER_TORCHRUN, "checkpoint.interval=1",
              "checkpoint.persist_interval=4", env=pause(tmp_path, "step@6:60"))
    pid = int(run.wait_for(r"paused in step \(rank 0 after step 6\) pid (\d+)").group(1))
    memory = shm_root_for(tmp_path / "run")
    slot = memory / complete_slot(memory / "node0", 6)["file"]
    data = bytearray(slot.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes
    slot.write_bytes(bytes(data))
    os.kill(pid, signal.SIGKILL)
    log = run.finish()
    assert re.search(r"skipping memory snapshot 6: .*checksum mismatch", log), log
    [(source, step)] = resumes(log)
    assert source.startswith("memory:") and step == 5, log  # the other slot


def test_init_from_and_resume_skip_a_damaged_newest_checkpoint(tmp_path, data_cache):
    source = tmp_path / "source"
    steps = ("schedule.total_steps=6", "checkpoint.persist_interval=2")
    perennial("train", *tiny_job(source, data_cache, *steps, "train.max_steps=4"))
    state = source / "checkpoints" / "step-00000004" / "state.json"
    text = state.read_text()
    assert '"epoch": 0' in text
    state.write_text(text.replace('"epoch": 0', '"epoch": 1', 1))  # one bit of the data cursor

    warm = perennial("train", *tiny_job(tmp_path / "warm", data_cache, *steps,
                                        "train.max_steps=2", f"init.from={source}"))
    assert "skipping checkpoint" in warm.stderr and "state.json: checksum mismatch" in warm.stderr
    assert "warm start: weights from " in warm.stderr and "step-00000002" in warm.stderr
    resumed = perennial("train", *tiny_job(source, data_cache, *steps, "train.max_steps=6"))
    assert "step-00000004: state.json: checksum mismatch" in resumed.stderr, resumed.stderr
    assert "resumed from" in resumed.stderr and "(step 2)" in resumed.stderr, resumed.stderr


def test_shared_memory_too_small_in_fact_turns_the_memory_tier_off(tmp_path, data_cache):
    """The launcher's check passes (the tmpfs holds the estimate), then something else fills
    the tmpfs before the first snapshot maps its slots: the run goes on with disk checkpoints."""
    with mounted_tmpfs(tmp_path / "shm", "16m") as shm:
        run = Run(tmp_path / "run", data_cache, *IN_PROCESS, "train.max_steps=4",
                  "schedule.total_steps=4", "checkpoint.persist_interval=2",
                  env={"PERENNIAL_SHM_BASE": str(shm), **pause(tmp_path, "step@1:5")})
        run.wait_for(r"paused in step")  # after step 1; the slots are mapped at step 2
        stat = os.statvfs(shm)
        free = stat.f_bavail * stat.f_frsize
        (shm / "filler").write_bytes(b"\0" * (free - 64 * 1024))
        run.proc.wait(timeout=240)
        run.reader.join(timeout=10)
    assert run.proc.returncode == 0, run.log
    assert "memory snapshots are off" in run.log and "disk checkpoints" in run.log, run.log
    for step in (2, 4):
        assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()


def test_unusable_state_stops_the_run_unless_fresh(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    job = ("schedule.total_steps=4", "checkpoint.persist_interval=2")
    perennial("train", *tiny_job(run_dir, data_cache, *job, "train.max_steps=2"))
    state = run_dir / "checkpoints" / "step-00000002" / "state.json"
    state.write_text(state.read_text().replace('"epoch": 0', '"epoch": 1', 1))
    again = perennial("train", *tiny_job(run_dir, data_cache, *job, "train.max_steps=4"),
                      check=False)
    assert again.returncode == 2 and "nothing usable to resume" in again.stderr, again.stderr
    assert "pass --fresh" in again.stderr
    assert not (run_dir / "checkpoints" / "step-00000004").exists()
    fresh = perennial("train", *tiny_job(run_dir, data_cache, *job, "train.max_steps=4"),
                      "--fresh")
    assert "--fresh: starting from scratch" in fresh.stderr, fresh.stderr
    assert [r["step"] for r in metrics(run_dir)][:2] == [1, 2]
