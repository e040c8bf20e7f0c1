"""The continual pretraining experiment: its job configs, its report, and (slow) a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scripts import continual_experiment as ce
from trainer.config_loader import load_config
from trainer.schedule import build_schedule

SCALE = ce.SCALES["tiny"]


@pytest.fixture
def jobs(tmp_path: Path) -> tuple[dict, dict]:
    pretrains = ce.pretrain_jobs(SCALE, tmp_path, tmp_path / "cache")
    return pretrains, ce.continuation_jobs(SCALE, tmp_path, tmp_path / "cache", pretrains)


def schedule_of(job: dict):
    return build_schedule(dict(job["schedule"]), job["optim"]["lr"])


def test_every_job_is_a_valid_config(jobs, tmp_path):
    pretrains, continuations = jobs
    for job in pretrains.values():
        Path(job["run"]["dir"]).mkdir()  # init.from must exist
    for name, job in (pretrains | continuations).items():
        path = tmp_path / f"{name}.yaml"
        OmegaConf.save(OmegaConf.create(job), path)
        cfg = load_config(path)
        assert cfg.train.max_steps == job["train"]["max_steps"]


def test_rewarm_starts_from_the_pretraining_final_lr(jobs):
    pretrains, continuations = jobs
    end_lr = schedule_of(pretrains["pretrain_cosine"]).final_lr
    assert math.isclose(end_lr, ce.MIN_LR)
    for variant in ("rewarm", "rewarm_replay"):
        schedule = schedule_of(continuations[variant])
        assert continuations[variant]["schedule"]["init_lr"] == end_lr
        assert schedule.lr(schedule.config.warmup_steps) == ce.PEAK_LR
        assert math.isclose(schedule.final_lr, ce.MIN_LR)
    no_rewarm = schedule_of(continuations["no_rewarm"])
    assert no_rewarm.lr(0) == no_rewarm.final_lr == end_lr


def test_infinite_continues_on_the_plateau_and_anneals_at_the_end(jobs):
    pretrains, continuations = jobs
    pretrain = schedule_of(pretrains["pretrain_infinite"])
    assert math.isclose(pretrain.final_lr, ce.PLATEAU_LR)
    continued = schedule_of(continuations["infinite"])
    anneal_start = SCALE.continue_steps - continuations["infinite"]["schedule"]["anneal_steps"]
    assert all(continued.lr(s) == pretrain.final_lr for s in range(anneal_start + 1))
    assert math.isclose(continued.final_lr, ce.MIN_LR)
    assert continuations["infinite"]["init"]["from"] == pretrains["pretrain_infinite"]["run"]["dir"]


def test_infinite_variant_needs_an_infinite_pretraining(jobs):
    pretrains, _ = jobs
    with pytest.raises(ValueError, match="infinite pretraining"):
        ce.continuation_schedule("infinite", SCALE, pretrains["pretrain_cosine"])
    with pytest.raises(ValueError, match="unknown variant"):
        ce.continuation_schedule("retrain", SCALE, pretrains["pretrain_cosine"])


def test_continuations_have_equal_compute_and_keep_the_optimizer(jobs):
    _, continuations = jobs
    assert list(continuations) == list(ce.VARIANTS)
    assert {job["train"]["max_steps"] for job in continuations.values()} == {SCALE.continue_steps}
    assert all(job["init"]["load_optimizer"] for job in continuations.values())
    continuations["rewarm"]["train"]["max_steps"] += 1
    with pytest.raises(ValueError, match="differ in compute"):
        ce.check_equal_compute(continuations)


def test_both_domains_are_evaluated_in_every_phase(jobs):
    pretrains, continuations = jobs
    weights = {name: {s["name"]: s["weight"] for s in job["data"]["sources"]}
               for name, job in (pretrains | continuations).items()}
    assert weights["pretrain_cosine"] == {"prose": 1.0, "code": 0.0}
    assert weights["rewarm"] == {"prose": 0.0, "code": 1.0}
    assert weights["rewarm_replay"] == {"prose": ce.REPLAY_SHARE, "code": 1 - ce.REPLAY_SHARE}


def synthetic_records(steps: int, a_start: float, a_slope: float, b_slope: float) -> list[dict]:
    return [{"step": s, "loss": 3.0, "lr": 1e-3,
             "eval_loss": {"prose": a_start + a_slope * s, "code": 3.0 - b_slope * s},
             "tokens_by_source": {"prose": 0, "code": 64 * s}} for s in range(1, steps + 1)]


def synthetic_results() -> dict[str, ce.VariantResult]:
    pretrain = [{"step": 8, "loss": 2.0, "lr": 3e-4, "eval_loss": {"prose": 2.0, "code": 3.0}}]
    return {variant: ce.summarize(pretrain, synthetic_records(6, 2.0, 0.1 * i, 0.05 * i))
            for i, variant in enumerate(ce.VARIANTS)}


def test_summary_starts_at_the_end_of_pretraining():
    result = synthetic_results()["rewarm"]
    assert result.evals[0] == {"prose": 2.0, "code": 3.0}
    assert result.final_step == 6
    assert ce.equal_steps(synthetic_results()) == [2, 3, 6]


def test_report_has_a_row_per_variant_and_keeps_hand_written_text(tmp_path):
    ce.write_report(tmp_path, synthetic_results(), "setup text", "1 min")
    doc = tmp_path / ce.DOC_NAME
    doc.write_text(doc.read_text() + "\n## Reading\n\nhand-written\n")
    ce.write_report(tmp_path, synthetic_results(), "setup text", "2 min")
    text = doc.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == len(ce.VARIANTS)
    assert "| (b) re-warm + re-decay | 2.000 | 2.600 | +0.600 |" in text
    assert "hand-written" in text and "2 min" in text and "1 min" not in text
    assert (tmp_path / ce.PLOT_NAME).stat().st_size > 10_000


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path):
    ce.main(["--tiny", "--out-dir", str(tmp_path)])
    text = (tmp_path / ce.DOC_NAME).read_text()
    assert all(ce.LABELS[variant] in text for variant in ce.VARIANTS)
    assert (tmp_path / ce.PLOT_NAME).exists()
