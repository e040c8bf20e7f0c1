"""`perennial slurm` on a real one-node Slurm cluster (scripts/setup_slurm.sh): the sbatch
scripts it writes pass `sbatch --test-only`, and a submitted job that an admin requeues mid-run
(`scontrol requeue`, what preemption does) saves, restarts, resumes and ends with the same
weights as an uninterrupted run. Skipped only when Slurm cannot be installed or started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from launch.keepers import resolve_keeper_peer
from tests.trainer.runs import REPO, metrics, perennial, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights
from trainer.distributed import free_port

SETUP = REPO / "scripts" / "setup_slurm.sh"
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2"]
MAX_STEPS = 8
TRAIN = ["checkpoint.interval=2", "checkpoint.persist_interval=4", f"train.max_steps={MAX_STEPS}"]


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"Slurm cannot be installed or started here: {reason}")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def write_script(run_dir: Path, *args: str) -> str:
    proc = perennial("slurm", f"run.dir={run_dir}", *args)
    script = run_dir / "slurm" / "job.sbatch"
    assert proc.stdout.strip() == f"wrote {script}"
    return script.read_text()


def sbatch_test_only(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--test-only", str(run_dir / "slurm" / "job.sbatch")],
                          capture_output=True, text=True, timeout=60)


# -- what `perennial slurm` writes and refuses (no cluster needed) ---------------------------
def test_script_runs_the_launcher_once_per_node(tmp_path):
    script = write_script(tmp_path, "train.global_batch_size=64", "train.micro_batch_size=2",
                          "--nodes", "4", "--gpus-per-node", "8", "--rdzv-port", "29612")
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks-per-node=1\n" in script and "--cpus-per-task" not in script
    assert f"#SBATCH --output={tmp_path}/slurm/%j.out\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"run.dir={tmp_path}" in srun and '--rdzv-endpoint "$HEAD:29612"' in srun
    assert "if [[ $code -eq 143 ]]; then" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_nodes_replicate_snapshots_to_the_next_node(tmp_path):
    script = write_script(tmp_path / "four", "train.global_batch_size=64",
                          "train.micro_batch_size=2", "--nodes", "4", "--gpus-per-node", "8",
                          "--rdzv-port", "29612")
    assert "--keeper-port 29613 --keeper-peer slurm" in script
    assert "--keeper-peer" not in write_script(tmp_path / "one", *CPU_JOB)


def test_slurm_peer_is_the_next_host_of_the_node_list(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09]")
    for node_id, peer in (("0", "gpu08:29613"), ("2", "gpu07:29613")):
        monkeypatch.setenv("SLURM_NODEID", node_id)
        assert resolve_keeper_peer("slurm", 29613) == peer
    assert resolve_keeper_peer("10.0.0.2:29613", 29613) == "10.0.0.2:29613"


def test_slurm_peer_outside_a_job_names_the_variables(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        resolve_keeper_peer("slurm", 29613)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "1", "--gpus-per-node", "4", "--nproc-per-node", "2"],
         "--nproc-per-node (2) must equal --gpus-per-node (4)"),
        (["--nodes", "0", "--gpus-per-node", "1"], "--nodes must be >= 1"),
        (["--nodes", "1", "--gpus-per-node", "0", "--time", "banana"],
         "--time 'banana' is not a Slurm time limit"),
        (["--nodes", "2", "--gpus-per-node", "5"], "world size 10 does not fit the config"),
    ],
    ids=["nproc-vs-gpus", "no-nodes", "bad-time", "world-size"],
)
def test_launch_mistakes_are_one_line(tmp_path, args, message):
    proc = perennial("slurm", f"run.dir={tmp_path}", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "slurm" / "job.sbatch").exists()


# -- on the local cluster -----------------------------------------------------------------
def test_one_node_two_cpu_workers(slurm, tmp_path):
    script = write_script(tmp_path, "train.global_batch_size=16", *CPU_JOB)
    assert "#SBATCH --cpus-per-task=2" in script and "--gpus-per-node" not in script
    assert "--nproc 2 --nnodes 1 --max-restarts 3" in script
    proc = sbatch_test_only(tmp_path)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def test_partition_time_and_account(slurm, tmp_path):
    script = write_script(tmp_path, *CPU_JOB, "--partition", "debug", "--time", "0-00:30:00",
                          "--account", "research", "--job-name", "pt")
    for option in ("--partition=debug", "--time=0-00:30:00", "--account=research",
                   "--job-name=pt", "--signal=TERM@120", "--requeue"):
        assert f"#SBATCH {option}\n" in script
    proc = sbatch_test_only(tmp_path)
    assert proc.returncode == 0 and "partition debug" in proc.stderr, proc.stderr


def test_four_nodes_of_eight_gpus(slurm, tmp_path):
    script = write_script(tmp_path, "train.global_batch_size=64", "train.micro_batch_size=2",
                          "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00")
    assert "#SBATCH --nodes=4\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "--nproc 8 --nnodes 4" in script and '--rdzv-endpoint "$HEAD:29500"' in script
    # sbatch parses every option and the controller understands the request; this one-node,
    # GPU-less cluster can only say it has no such nodes.
    proc = sbatch_test_only(tmp_path)
    assert proc.stderr.strip() == (
        "allocation failure: Requested node configuration is not available"
    ), proc.stderr


def test_test_only_rejects_what_slurm_cannot_parse(slurm, tmp_path):
    """The harness can fail: a script with an option Slurm rejects does not pass."""
    write_script(tmp_path, *CPU_JOB, "--partition", "no-such-partition")
    proc = sbatch_test_only(tmp_path)
    assert proc.returncode != 0 and "invalid partition" in proc.stderr.lower()


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(f"{name}="):
            return token.split("=", 1)[1]
    return ""


def wait_job(job: str, states: set[str], timeout_s: float = 150) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_field(job, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    state = job_field(job, "JobState")
    raise AssertionError(f"job {job} not in {states} after {timeout_s} s: {state}")


def wait_step(run_dir: Path, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and any(r["step"] >= step for r in metrics(run_dir))):
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_requeued_job_resumes_and_matches_an_uninterrupted_run(
    slurm, tmp_path, data_cache, monkeypatch
):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    perennial("train", *tiny_job(ref_dir, data_cache, *TRAIN), "--nproc", "2")

    # sbatch passes this environment to the job: a slow job, so it is still running when
    # the requeue comes.
    monkeypatch.setenv("PERENNIAL_FAULT_STEP_DELAY_S", "0.4")
    submitted = perennial("slurm", *tiny_job(run_dir, data_cache, *TRAIN), *CPU_JOB,
                          "--rdzv-port", str(free_port()), "--submit")
    job = submitted.stdout.split("submitted job ")[1].split()[0]
    try:
        wait_step(run_dir, 3)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        wait_job(job, {"PENDING"})
        # Slurm holds a requeued job back for two minutes; start it now.
        subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)
        assert wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    err = (run_dir / "slurm" / f"{job}.err").read_text()
    out = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "restart 1" in out and "DUE TO JOB REQUEUE" in err
    saved = int(err.split("SIGTERM: saving step ")[1].split()[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{saved:08d}'}" in err
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(ref_dir, tmp_path))
