"""The growth experiment: its job configs, its report, and (slow) the --quick run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scripts import growth_experiment as ge
from trainer.config_loader import load_config

SCALE = ge.SCALES["quick"]


def test_grown_runs_are_valid_configs_with_equal_compute(tmp_path: Path):
    jobs = ge.grown_jobs(SCALE, tmp_path, tmp_path / "cache")
    assert set(jobs) == set(ge.RUNS)
    shapes = set()
    for name, job in jobs.items():
        if "init" in job:
            Path(job["init"]["from"]).mkdir(exist_ok=True)  # init.from must exist
        path = tmp_path / f"{name}.yaml"
        OmegaConf.save(OmegaConf.create(job), path)
        cfg = load_config(path)
        shapes.add((cfg.train.max_steps, cfg.train.global_batch_size, cfg.data.seq_len,
                    cfg.schedule.warmup_steps, cfg.optim.lr, cfg.train.seed))  # fmt: skip
    assert len(shapes) == 1
    assert jobs["upcycled"]["model"]["moe"] == {"num_experts": 4, "top_k": 2}
    assert jobs["gstack"]["model"]["n_layers"] == jobs["deep_scratch"]["model"]["n_layers"] == 2
    assert "init" not in jobs["deep_scratch"]
    long = ge.deep_long_job(SCALE, tmp_path, tmp_path / "cache")
    assert long["train"]["max_steps"] == SCALE.pretrain_steps + SCALE.grown_steps


def test_table_and_verdicts_compare_at_common_steps():
    curves = {
        "dense_continued": {10: 3.0, 20: 2.5},
        "upcycled": {10: 2.9, 20: 2.4},
        "deep_scratch": {10: 3.5, 20: 3.0},
        "gstack": {10: 3.1, 20: 3.2},
    }
    table = ge.results_table(curves, {"gstack": 12.0}, {"gstack": (2_500_000, 1_250_000)})
    assert "deep_long" not in ge.verdicts(curves, 300)[0]
    row = "| G_stack (2x) of the trained shallow model | 2.50M (1.25M) | 3.100 | 3.200 | 12 s |"
    assert row in table
    lines = ge.verdicts({**curves, "deep_long": {100: 3.4, 170: 3.2, 320: 3.0}}, 300)
    assert lines[0].endswith("G_stack 3.200, deep from scratch 3.000 (+0.200).")
    assert lines[1].endswith("deep from scratch at step 170: 3.200.")
    assert "-0.100 nats/byte, lower (better)" in lines[2]
    assert "+0.200 nats/byte, higher (worse)" in lines[3]


@pytest.mark.slow
def test_quick_run_writes_report_and_plot(tmp_path: Path):
    assert ge.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / ge.DOC_NAME).read_text()
    assert report.count("\n| ") == 6  # header, rule and the four runs
    assert (tmp_path / ge.PLOT_NAME).stat().st_size > 10_000
    curves = {name: ge.eval_curve(tmp_path / name) for name in ge.RUNS}
    assert all(set(curve) == {2, 4} for curve in curves.values())
    # upcycling is exact and both continue the same data: the first evals are close
    assert abs(curves["upcycled"][2] - curves["dense_continued"][2]) < 0.05
    dense = ge.param_counts(tmp_path / "dense_continued")
    moe = ge.param_counts(tmp_path / "upcycled")
    assert dense[0] == dense[1] < moe[1] < moe[0]
