"""Memory snapshots of an MoE model: the stacked-expert layout travels through the keeper into
the checkpoints it persists, and a killed rank resumes from memory bitwise as if never killed."""

from __future__ import annotations

import json
import re

import pytest

from tests.trainer.runs import perennial, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights

MOE_JOB = ["model.moe.num_experts=4", "model.moe.top_k=2", "train.max_steps=8",
           "schedule.total_steps=8", "checkpoint.interval=2", "checkpoint.persist_interval=4"]


def moe_run(run_dir, cache, faults: str = ""):
    return perennial("train", *tiny_job(run_dir, cache, *MOE_JOB), "--nproc", "2",
                     "--max-restarts", "2", env={"PERENNIAL_FAULT_PAUSE": faults})


@pytest.mark.slow
def test_moe_snapshots_resume_bitwise_and_persist_stacked_layouts(tmp_path, data_cache):
    reference = moe_run(tmp_path / "reference", data_cache)
    assert "resumed from" not in reference.stderr
    killed = moe_run(tmp_path / "killed", data_cache, f"step@6:kill:{tmp_path / 'marker'}")
    (source, step), = re.findall(r"resumed from (\S+) \(step (\d+)\)", killed.stderr)
    # Killed right after the snapshot of step 6 started: its copy may or may not have finished.
    assert source.startswith("memory:") and int(step) in (4, 6), killed.stderr

    index = json.loads((tmp_path / "killed/checkpoints/step-00000004/index.json").read_text())
    experts = {k: v["layout"] for k, v in index["tensors"].items()
               if ".experts.w" in k and v["shape"]}  # weights and moments, not Adam's step
    assert experts and all(r == {"kind": "stacked", "num_experts": 4} for r in experts.values())
    assert_bitwise_equal(final_weights(tmp_path / "killed", tmp_path),
                         final_weights(tmp_path / "reference", tmp_path))
