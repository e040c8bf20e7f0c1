"""`perennial train` with parallel.pp=2: the pipelined step trains with the one-process losses,
and its checkpoints (each rank saves only its stage's tensors, under the plain names) resume
bitwise on pp=2 and within 1e-3 relative on one process without a pipeline."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from checkpointing.commit import write_latest
from checkpointing.format import step_dir_name
from tests.trainer.runs import (
    assert_same_losses,
    finish_copied_run,
    losses,
    perennial,
    tiny_job,
    train,
)
from trainer.config_loader import load_config, validate_layout

# 5 layers: 1F1B / GPipe split them 3 + 2, Interleaved1F1B 2 + 1 + 1 + 1 over two ranks.
PP_JOB = ["model.n_layers=5", "schedule.total_steps=6", "checkpoint.persist_interval=3",
          "eval.interval=3"]
PP2 = "parallel.pp=2"


def stopped_at_step_3(run_dir: Path, copy_to: Path) -> Path:
    """A copy of a 6-step run dir as if the run had stopped after its step-3 checkpoint."""
    shutil.copytree(run_dir, copy_to)
    shutil.rmtree(copy_to / "checkpoints" / step_dir_name(6))
    write_latest(copy_to / "checkpoints", step_dir_name(3))
    return copy_to


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory, data_cache):
    """(records of an uninterrupted one-process run, of an uninterrupted pp=2 1F1B run, and
    {"pp1": .., "pp2": ..} run dirs holding only their step-3 checkpoint)."""
    one_dir, pp2_dir = tmp_path_factory.mktemp("pp1-ref"), tmp_path_factory.mktemp("pp2-ref")
    one = train(one_dir, data_cache, 1, *PP_JOB, "train.max_steps=6")
    pp2 = train(pp2_dir, data_cache, 2, *PP_JOB, PP2, "train.max_steps=6")
    halves = tmp_path_factory.mktemp("halves")
    return one, pp2, {"pp1": stopped_at_step_3(one_dir, halves / "pp1"),
                      "pp2": stopped_at_step_3(pp2_dir, halves / "pp2")}


def test_pp2_1f1b_trains_with_the_one_process_losses(pp_runs):
    one, pp2, _ = pp_runs
    assert [r["step"] for r in pp2] == list(range(1, 7))
    torch.testing.assert_close(losses(pp2), losses(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([r["grad_norm"] for r in pp2], [r["grad_norm"] for r in one],
                               rtol=1e-4, atol=1e-5)
    evals = [[r["eval_loss"] for r in records if "eval_loss" in r] for records in (pp2, one)]
    assert len(evals[0]) == 2  # steps 3 and 6
    torch.testing.assert_close(evals[0], evals[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["GPipe", "Interleaved1F1B"])
def test_pp2_other_schedules_train_with_the_one_process_losses(tmp_path, data_cache, pp_runs,
                                                               schedule):
    one = {step: loss for step, loss in losses(pp_runs[0]).items() if step <= 3}
    records = train(tmp_path, data_cache, 2, *PP_JOB, PP2, f"parallel.pp_schedule={schedule}",
                    "train.max_steps=3")
    torch.testing.assert_close(losses(records), one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source, nproc, layout, exact", [
    ("pp2", 2, PP2, True),
    ("pp2", 1, "parallel.pp=1", False),
    ("pp1", 2, PP2, False),
], ids=["pp2-to-pp2-bitwise", "pp2-to-one-process", "one-process-to-pp2"])
def test_pipeline_checkpoints_resume(tmp_path, data_cache, pp_runs, source, nproc, layout,
                                     exact):
    one, pp2, halves = pp_runs
    records = finish_copied_run(halves[source], tmp_path / "run", data_cache, nproc, 6,
                                *PP_JOB, layout)
    assert_same_losses(records, pp2 if exact else one, exact)


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["parallel.tp=1", "parallel.tp=2"], ids=["pp2xdp2", "pp2xtp2"])
def test_pp2_composes_on_four_ranks_and_resumes_on_one(tmp_path, data_cache, pp_runs, inner):
    """pp=2 with FSDP2 over dp=2, or with TP=2: the one-process losses; its checkpoint (DTensor
    shards of each stage) resumes on one process within 1e-3 relative."""
    one = losses(pp_runs[0])
    first = train(tmp_path, data_cache, 4, *PP_JOB, PP2, inner, "train.max_steps=3")
    torch.testing.assert_close(losses(first), {s: one[s] for s in (1, 2, 3)},
                               rtol=1e-5, atol=1e-5)
    resumed = train(tmp_path, data_cache, 1, *PP_JOB, "train.max_steps=6")
    torch.testing.assert_close(losses(resumed), one, rtol=1e-3, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layers=1"], "model.n_layers (1) is fewer than the pipeline stages (2"),
    (["parallel.pp_schedule=Interleaved1F1B", "model.n_layers=3"],
     "model.n_layers (3) is fewer than the pipeline stages (4"),
    (["parallel.pp=3", "model.n_layers=4"],
     "parallel.pp (3) x parallel.tp (1) does not divide the world size 2"),
    (["train.global_batch_size=6", "train.micro_batch_size=6"],
     "parallel.pp_microbatches (1) must divide"),
    (["parallel.pp_microbatches=5"], "parallel.pp_microbatches (5) must divide"),
    (["parallel.pp_schedule=ZeroBubble"], "parallel.pp_schedule must be one of"),
    (["parallel.strategy=deepspeed"], "parallel.pp > 1 is not supported with parallel.strategy"),
    (["model.moe.num_experts=4"], "parallel.pp > 1 is not supported with an MoE model"),
    (["grow.at_step=2", "grow.kind=stack"], "parallel.pp > 1 is not supported with grow.at_step"),
])
def test_impossible_pipeline_layouts_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg = load_config(None, [PP2, "train.global_batch_size=12", "eval.interval=0",
                                 *overrides])
        validate_layout(cfg, 2)


def test_impossible_pipeline_layout_is_one_line_before_any_process_group(tmp_path, data_cache):
    job = tiny_job(tmp_path, data_cache, PP2, "model.n_layers=1")
    proc = perennial("train", *job, "--nproc", "2", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.n_layers (1) is fewer than" in lines[0], proc.stderr
