"""Expert-parallel checkpoints are layout-free: an ep=2 run resumes bitwise on ep=2 and within
1e-3 relative on one process without EP (the saved experts are global stacked tensors)."""


import pytest

from tests.trainer.runs import (
    assert_same_losses,
    finish_copied_run,
    perennial,
    tiny_job,
    train,
)

MOE_JOB = [
    "schedule.total_steps=6",
    "checkpoint.persist_interval=3",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
]
EP2 = (2, "parallel.ep=2")


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory, data_cache):
    """(records of an uninterrupted ep=2 run, a run dir holding the step-3 ep=2 checkpoint)."""
    reference = train(tmp_path_factory.mktemp("ep2-ref"), data_cache, EP2[0], *MOE_JOB, EP2[1],
                      "train.max_steps=6")
    half = tmp_path_factory.mktemp("ep2-half")
    train(half, data_cache, EP2[0], *MOE_JOB, EP2[1], "train.max_steps=3")
    return reference, half


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, layout, exact",
    [(2, "parallel.ep=2", True), (1, "parallel.ep=1", False)],
    ids=["ep2-to-ep2-bitwise", "ep2-to-no-ep"],
)
def test_expert_parallel_resume(tmp_path, data_cache, ep2_runs, nproc, layout, exact):
    reference, half = ep2_runs
    records = finish_copied_run(half, tmp_path / "run", data_cache, nproc, 6, *MOE_JOB, layout)
    assert_same_losses(records, reference, exact)
    share = records[-1]["moe_expert_share"]
    assert sorted(share) == ["0", "1"] and all(len(row) == 4 for row in share.values())
    assert all(abs(sum(row) - 1) < 1e-3 for row in share.values())
    assert records[-1]["moe_aux_loss"] > 0


def test_impossible_expert_layout_is_one_line_before_any_process_group(tmp_path, data_cache):
    job = tiny_job(tmp_path, data_cache, "model.moe.num_experts=3", "parallel.ep=2")
    proc = perennial("train", *job, "--nproc", "2", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.moe.num_experts (3)" in lines[0] and "parallel.ep" in lines[0]
