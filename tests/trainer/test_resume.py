"""Automatic resume: bitwise on the same layout, within fp32 tolerance on another one, and
falling back past a damaged checkpoint."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpointing import resolve_checkpoint
from checkpointing.inspect import export_safetensors
from tests.trainer.runs import REPO, losses, metrics, perennial, train

# The schedule is 8 steps long whatever step a run stops at, so a resumed run is the same job.
# Two sources mixed 3:1 (prose with a replay of code), so resuming must restore the mix too.
JOB = [
    "schedule.total_steps=8",
    "checkpoint.persist_interval=4",
    "data.sources=[{name: prose, path: 'stdlib:prose', weight: 0.75},"
    " {name: code, path: 'stdlib:code', weight: 0.25}]",
]


def final_weights(run_dir, tmp_path):
    """The model tensors of the run's newest checkpoint, as `perennial ckpt export` writes them
    (its own tests run the command; here it runs in this process: a command costs seconds)."""
    out = tmp_path / f"{run_dir.name}-export.safetensors"
    export_safetensors(resolve_checkpoint(run_dir), out)
    return load_file(out)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("reference")
    records = train(run_dir, data_cache, 1, *JOB, "train.max_steps=8")
    return run_dir, records


def test_same_layout_resume_is_bitwise(tmp_path, data_cache, reference):
    ref_dir, ref_records = reference
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, 1, *JOB, "train.max_steps=4")
    records = train(run_dir, data_cache, 1, *JOB, "train.max_steps=8")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert losses(records) == losses(ref_records)
    assert records[-1]["tokens_by_source"] == ref_records[-1]["tokens_by_source"]
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(ref_dir, tmp_path))


def test_mix_follows_the_weights(reference):
    _, records = reference
    tokens = records[-1]["tokens_by_source"]
    assert tokens["prose"] == 3 * tokens["code"] == 3 * 8 * 12 * 32 // 4


@pytest.mark.parametrize(
    "first, second",
    [
        ((2, "parallel.strategy=ddp"), (3, "parallel.strategy=fsdp")),
        ((2, "parallel.tp=2"), (1, "parallel.strategy=ddp")),
    ],
    ids=["ddp2-to-fsdp3", "tp2-to-ddp1"],
)
def test_resume_on_another_layout(tmp_path, data_cache, reference, first, second):
    _, ref_records = reference
    train(tmp_path, data_cache, first[0], *JOB, first[1], "train.max_steps=4")
    records = train(tmp_path, data_cache, second[0], *JOB, second[1], "train.max_steps=8")
    torch.testing.assert_close(losses(records), losses(ref_records), rtol=1e-4, atol=1e-4)


def test_damaged_newest_checkpoint_falls_back(tmp_path, data_cache, reference):
    ref_dir, ref_records = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    shard = next((run_dir / "checkpoints" / "step-00000008").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify = perennial("ckpt", "verify", str(run_dir), check=False)
    assert verify.returncode != 0 and shard.name in verify.stdout + verify.stderr

    proc = perennial("train", *_job(run_dir, data_cache), "train.max_steps=8")
    assert "step-00000008" in proc.stderr and "step-00000004" in proc.stderr
    assert losses(metrics(run_dir)) == losses(ref_records)
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(ref_dir, tmp_path))


def _job(run_dir, data_cache):
    from tests.trainer.runs import tiny_job

    return tiny_job(run_dir, data_cache, *JOB)


def test_warm_start_then_resume_the_continued_run(tmp_path, data_cache, reference):
    ref_dir, ref_records = reference
    run_dir = tmp_path / "continued"
    job = _job(run_dir, data_cache)
    source = ref_dir / "checkpoints" / "step-00000004"
    first = perennial("train", *job, f"init.from={source}", "init.load_optimizer=true",
                      "init.load_schedule=true", "train.max_steps=2")
    assert f"warm start: weights + optimizer from {source}" in first.stderr
    records = metrics(run_dir)
    # The schedule continues from the source's step 4: the first step uses the LR of step 5.
    assert records[0]["lr"] == pytest.approx(ref_records[4]["lr"])
    assert records[0]["loss"] < ref_records[0]["loss"] - 0.5

    # A crash of the continued run resumes the continued run, not its source, and says so.
    second = perennial("train", *job, f"init.from={source}", "train.max_steps=3")
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'}" in second.stderr
    assert f"init.from={source} ignored: {run_dir / 'checkpoints'} already holds" in second.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_warm_start_from_a_missing_path_is_one_line(tmp_path, data_cache):
    proc = perennial("train", *_job(tmp_path, data_cache), f"init.from={tmp_path}/nowhere",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_already_at_max_steps_says_so(tmp_path, data_cache, reference):
    ref_dir, _ = reference
    run_dir = tmp_path / "done"
    shutil.copytree(ref_dir, run_dir)
    proc = perennial("train", *_job(run_dir, data_cache), "train.max_steps=8")
    assert f"nothing to train: {run_dir} is already at step 8 (train.max_steps=8)" in proc.stderr
    assert "start:" not in proc.stderr


def test_a_failed_resume_keeps_the_run_record(tmp_path, data_cache, reference):
    """The worker itself (no launcher preflight) fails to restore a changed model: config.yaml
    stays the run's; config-history/ keeps one file per start that got past the restore."""
    ref_dir, _ = reference
    run_dir = tmp_path / "kept"
    shutil.copytree(ref_dir, run_dir)
    before = (run_dir / "config.yaml").read_text()
    history = sorted((run_dir / "config-history").iterdir())
    assert len(history) == 1 and history[0].read_text() == before
    job = [*_job(run_dir, data_cache), "train.max_steps=9", "model.dim=128"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "trainer", *job], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (run_dir / "config.yaml").read_text() == before
    assert sorted((run_dir / "config-history").iterdir()) == history
    # ... and the launcher refuses it before any process starts, on one line.
    refused = perennial("train", *job, check=False)
    assert refused.returncode == 2 and "model.dim is 64 there, 128 now" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if line.startswith("error:")]) == 1
    perennial("train", *_job(run_dir, data_cache), "train.max_steps=9")
    assert len(list((run_dir / "config-history").iterdir())) == 2
