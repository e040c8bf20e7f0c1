import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from trainer.schedule import (
    SCHEDULES,
    ScheduleConfig,
    build_schedule,
    describe_schedule,
    lr_curve,
    plot_schedule,
)

MAX_LR = 1e-3
MIN_LR = 1e-4


def build(name: str, max_lr: float = MAX_LR, tokens_per_step: int | None = None, **overrides):
    fields = {"name": name, "total_steps": 1000, "warmup_steps": 10, "min_lr": MIN_LR,
              "cooldown_steps": 100, "plateau_lr": 5e-4, **overrides}
    return build_schedule(ScheduleConfig(**fields), max_lr, tokens_per_step)


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd", "infinite"])
def test_warmup_ends_exactly_at_max_lr(name):
    schedule = build(name)
    assert schedule.lr(10) == MAX_LR
    assert all(schedule.lr(step) < MAX_LR for step in range(10))


def test_first_step_gets_nonzero_lr_and_warmup_is_linear():
    schedule = build("cosine")
    assert schedule.lr(0) == pytest.approx(MAX_LR / 11)
    steps = [schedule.lr(step + 1) - schedule.lr(step) for step in range(10)]
    assert steps == pytest.approx([MAX_LR / 11] * 10)


def test_no_warmup_starts_at_max_lr():
    assert build("cosine", warmup_steps=0).lr(0) == MAX_LR


def test_cosine_ends_exactly_at_min_lr_and_holds_it():
    schedule = build("cosine")
    assert schedule.lr(1000) == MIN_LR
    assert schedule.lr(10**9) == MIN_LR
    assert schedule.final_lr == MIN_LR
    assert schedule.lr(505) == pytest.approx((MAX_LR + MIN_LR) / 2)


def test_rewarm_restarts_from_init_lr_then_redecays():
    first_phase = build("cosine")
    second_phase = build("cosine", init_lr=first_phase.final_lr, warmup_steps=50)
    increment = (MAX_LR - MIN_LR) / 51
    # The ramp leaves init_lr at the previous phase's last step (virtual step -1).
    assert second_phase.lr(0) == pytest.approx(MIN_LR + increment)
    assert second_phase.lr(0) - increment == pytest.approx(first_phase.final_lr)
    assert second_phase.lr(50) == MAX_LR
    assert second_phase.lr(1000) == MIN_LR


def test_wsd_stable_until_decay_start_then_decays_to_min_lr():
    schedule = build("wsd", decay_fraction=0.2)
    assert all(schedule.lr(step) == MAX_LR for step in range(10, 801))
    assert schedule.lr(801) < MAX_LR
    assert schedule.lr(900) == pytest.approx((MAX_LR + MIN_LR) / 2)
    assert schedule.lr(1000) == MIN_LR
    assert schedule.lr(1001) == MIN_LR


@pytest.mark.parametrize(("shape", "midpoint_factor"),
                         [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_decay_shape_midpoint(shape, midpoint_factor):
    schedule = build("wsd", decay_fraction=0.2, decay_shape=shape)
    assert schedule.lr(900) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * midpoint_factor)
    assert schedule.lr(1000) == MIN_LR


def test_wsd_cosine_and_linear_differ_at_quarter():
    linear, cosine = build("wsd", decay_shape="linear"), build("wsd", decay_shape="cosine")
    assert cosine.lr(850) > linear.lr(850)


def test_infinite_holds_plateau_for_its_length_then_anneals():
    schedule = build("infinite", cooldown_steps=100, plateau_lr=5e-4, anneal_steps=200)
    assert schedule.lr(10) == MAX_LR
    assert 5e-4 < schedule.lr(109) < MAX_LR
    plateau = [step for step in range(1001) if schedule.lr(step) == 5e-4]
    assert plateau == list(range(110, 801))
    assert schedule.lr(900) == pytest.approx((5e-4 + MIN_LR) / 2)
    assert schedule.lr(1000) == schedule.lr(5000) == MIN_LR


def test_infinite_without_anneal_stays_on_plateau():
    schedule = build("infinite", anneal_steps=0)
    assert schedule.lr(110) == schedule.lr(1000) == schedule.lr(10**6) == 5e-4


def test_infinite_inv_sqrt_cooldown():
    schedule = build("infinite", cooldown_shape="inv-sqrt", cooldown_steps=100, plateau_lr=2.5e-4)
    alpha = ((MAX_LR / 2.5e-4) ** 2 - 1) / 100
    assert schedule.lr(10) == MAX_LR
    assert schedule.lr(60) == pytest.approx(MAX_LR / math.sqrt(1 + alpha * 50))
    assert schedule.lr(110) == 2.5e-4
    cooldown = [schedule.lr(step) for step in range(10, 111)]
    assert cooldown == sorted(cooldown, reverse=True)


def test_power_formula_over_steps():
    schedule = build("power", warmup_steps=0, power_unit="steps", power_a=0.01, power_b=-0.51)
    assert schedule.lr(0) == MAX_LR
    for step in (1, 100, 999):
        assert schedule.lr(step) == pytest.approx(min(MAX_LR, 0.01 * step**-0.51))
    assert schedule.lr(100) < MAX_LR


def test_power_formula_over_tokens_with_offset_and_anneal():
    schedule = build("power", tokens_per_step=4096, power_a=4.6, power_offset=10**8,
                     anneal_steps=100, min_lr=1e-5)
    for step in (10, 500, 900):
        assert schedule.lr(step) == pytest.approx(4.6 * (10**8 + step * 4096) ** -0.51)
    assert schedule.lr(10) < MAX_LR  # the power law is already below max_lr at this offset
    assert schedule.lr(1000) == 1e-5


def test_power_warmup_ends_on_the_power_law():
    schedule = build("power", tokens_per_step=4096, power_offset=10**8)
    assert schedule.lr(10) == pytest.approx(4.6 * (10**8 + 10 * 4096) ** -0.51)


def test_power_with_tokens_needs_tokens_per_step():
    with pytest.raises(ValueError, match="tokens_per_step"):
        build("power", tokens_per_step=None)


def test_power_anneal_target_above_power_law_is_rejected():
    with pytest.raises(ValueError, match="schedule.min_lr"):
        build("power", tokens_per_step=4096, power_offset=10**12, anneal_steps=10, min_lr=9e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"warmup_steps": 120, "total_steps": 100},
     "schedule.warmup_steps (120) must be < schedule.total_steps (100)"),
    ({"name": "linear"}, "schedule.name ('linear') must be one of constant, cosine, wsd"),
    ({"warmup_steps": -1}, "schedule.warmup_steps (-1) must be >= 0"),
    ({"min_lr": -1e-5}, "schedule.min_lr (-1e-05) must be >= 0"),
    ({"min_lr": 2e-3}, "schedule.min_lr (0.002) must be <= optim.lr (0.001)"),
    ({"init_lr": float("nan")}, "schedule.init_lr"),
    ({"total_steps": None}, "schedule.total_steps"),
    ({"name": "wsd", "decay_fraction": 0.0}, "schedule.decay_fraction (0.0) must be in (0, 1]"),
    ({"name": "wsd", "decay_fraction": 1.5}, "schedule.decay_fraction (1.5)"),
    ({"name": "wsd", "decay_fraction": 1.0}, "schedule.warmup_steps (10) must be <= the decay"),
    ({"name": "wsd", "decay_shape": "exp"}, "schedule.decay_shape ('exp') must be one of linear"),
    ({"name": "infinite", "plateau_lr": 2e-3}, "schedule.plateau_lr (0.002) must be <= optim.lr"),
    ({"name": "infinite", "cooldown_shape": "step"}, "schedule.cooldown_shape"),
    ({"name": "infinite", "anneal_steps": 950}, "schedule.warmup_steps + cooldown_steps + anneal"),
    ({"name": "infinite", "anneal_steps": 10, "plateau_lr": 5e-5}, "schedule.plateau_lr (5e-05)"),
    ({"name": "power", "power_b": 0.5}, "schedule.power_b (0.5) must be < 0"),
    ({"name": "power", "power_a": 0.0}, "schedule.power_a (0.0) must be > 0"),
    ({"name": "power", "power_unit": "bytes"}, "schedule.power_unit"),
])
def test_validation_names_the_key(overrides, message):
    cfg = ScheduleConfig(**{"total_steps": 1000, "warmup_steps": 10, "min_lr": MIN_LR,
                            "cooldown_steps": 100, "plateau_lr": 5e-4, **overrides})
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate(MAX_LR)


def test_validation_reports_every_problem_and_ignores_unused_fields():
    cfg = ScheduleConfig(name="cosine", total_steps=100, warmup_steps=-1, min_lr=-1.0,
                         plateau_lr=1.0, decay_shape="bogus")  # last two: unused by cosine
    with pytest.raises(ValueError) as error:
        cfg.validate(MAX_LR)
    assert "schedule.warmup_steps" in str(error.value) and "schedule.min_lr" in str(error.value)
    assert "plateau_lr" not in str(error.value) and "decay_shape" not in str(error.value)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"schedule\.lr_min"):
        build_schedule({"name": "cosine", "total_steps": 10, "lr_min": 0.0}, MAX_LR)


def test_structured_omegaconf_config_builds():
    cfg = OmegaConf.merge(OmegaConf.structured(ScheduleConfig),
                          OmegaConf.create("name: wsd\ntotal_steps: 100\nwarmup_steps: 5"))
    assert build_schedule(cfg, MAX_LR).lr(5) == MAX_LR


def test_state_dict_round_trip_detects_changes():
    schedule = build("cosine")
    state = json.loads(json.dumps(schedule.state_dict()))
    assert build("cosine").load_state_dict(state) == []
    assert build("cosine", plateau_lr=1e-4).load_state_dict(state) == []  # unused by cosine
    assert build("cosine", total_steps=2000).load_state_dict(state) == [
        "schedule.total_steps: 1000 -> 2000"]
    assert "optim.lr: 0.001 -> 0.002" in build("cosine", max_lr=2e-3).load_state_dict(state)
    assert "schedule.name: 'cosine' -> 'wsd'" in build("wsd").load_state_dict(state)
    with pytest.raises(ValueError, match="schedule.total_steps: 1000 -> 2000"):
        build("cosine", total_steps=2000).load_state_dict(state, strict=True)


def test_state_dict_tracks_tokens_per_step_for_power():
    state = build("power", tokens_per_step=4096).state_dict()
    assert build("power", tokens_per_step=8192).load_state_dict(state) == [
        "tokens_per_step: 4096 -> 8192"]


def test_describe_lists_phases_with_step_ranges():
    cfg = ScheduleConfig(name="infinite", total_steps=1000, warmup_steps=10, cooldown_steps=100,
                         plateau_lr=5e-4, anneal_steps=200)
    text = describe_schedule(cfg, MAX_LR)
    for expected in ("steps 0..10: linear warmup", "steps 10..110: cosine cooldown",
                     "steps 110..800: plateau 0.0005", "steps 800..1000: linear anneal"):
        assert expected in text
    wsd = describe_schedule(ScheduleConfig(name="wsd", total_steps=1000), MAX_LR)
    assert "steps 20..800: stable" in wsd and "steps 800..1000: linear decay" in wsd


def test_lr_curve_resolves_total_steps_and_matches_schedule():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr=MIN_LR)
    curve = lr_curve(cfg, MAX_LR, total_steps=100)
    schedule = build("cosine", total_steps=100)
    assert curve == [schedule.lr(step) for step in range(100)]
    longer = lr_curve(ScheduleConfig(name="cosine", total_steps=100), MAX_LR, total_steps=150)
    assert longer[100:] == [longer[100]] * 50


def test_plot_writes_png(tmp_path):
    out = tmp_path / "lr.png"
    plot_schedule({"cosine": lr_curve(ScheduleConfig(total_steps=50), MAX_LR, 50),
                   "wsd": build("wsd", total_steps=50)}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_schedule([[1.0, 0.5, 0.0]], tmp_path / "bare.png")
    assert (tmp_path / "bare.png").stat().st_size > 0


@st.composite
def valid_schedules(draw, names=SCHEDULES, min_phase: int = 0):
    name = draw(st.sampled_from(names))
    total = draw(st.integers(max(2, 4 * min_phase), 1500))
    warmup = draw(st.integers(min_phase, total // 4))
    max_lr = draw(st.floats(1e-5, 1e-1))
    fields = {"name": name, "total_steps": total, "warmup_steps": warmup,
              "min_lr": max_lr * draw(st.floats(0, 1)), "init_lr": max_lr * draw(st.floats(0, 1)),
              "decay_shape": draw(st.sampled_from(["linear", "cosine", "1-sqrt"]))}
    tokens_per_step = None
    if name == "wsd":
        longest = (total - warmup - 0.5) / total  # keeps the decay start after the warmup
        fields["decay_fraction"] = draw(st.floats(max(min_phase / total, 1e-3), longest))
    if name == "infinite":
        cooldown = draw(st.integers(min_phase, (total - warmup) // 2))
        anneal = draw(st.sampled_from([0, draw(st.integers(min_phase, total - warmup - cooldown))]))
        fields.update(cooldown_steps=cooldown, anneal_steps=anneal,
                      plateau_lr=draw(st.floats(fields["min_lr"], max_lr)) or max_lr,
                      cooldown_shape=draw(st.sampled_from(["cosine", "inv-sqrt"])))
    if name == "power":
        tokens_per_step = draw(st.integers(1, 10**6))
        fields.update(power_a=draw(st.floats(1e-4, 10)), power_b=draw(st.floats(-1, -0.1)),
                      power_unit=draw(st.sampled_from(["tokens", "steps"])),
                      anneal_steps=draw(st.integers(0, total - warmup)), min_lr=0.0)
    return build_schedule(ScheduleConfig(**fields), max_lr, tokens_per_step)


@settings(max_examples=150, deadline=None)
@given(valid_schedules())
def test_lr_is_finite_non_negative_bounded_and_holds_after_the_end(schedule):
    total = schedule.config.total_steps
    lrs = [schedule.lr(step) for step in range(total + 20)]
    assert all(math.isfinite(lr) and 0.0 <= lr <= schedule.max_lr for lr in lrs)
    assert lrs[total:] == [schedule.final_lr] * 20


@settings(max_examples=100, deadline=None)
@given(valid_schedules(names=("constant", "cosine", "wsd")))
def test_warmup_hits_peak_and_decay_ends_at_min_lr(schedule):
    cfg = schedule.config
    assert schedule.lr(cfg.warmup_steps) == schedule.max_lr
    assert schedule.final_lr == (schedule.max_lr if cfg.name == "constant" else cfg.min_lr)
    after_warmup = [schedule.lr(step) for step in range(cfg.warmup_steps, cfg.total_steps + 1)]
    assert after_warmup == sorted(after_warmup, reverse=True)


@settings(max_examples=100, deadline=None)
@given(valid_schedules(names=("constant", "cosine", "wsd", "infinite"), min_phase=100))
def test_lr_is_continuous_when_every_phase_is_long(schedule):
    cfg = schedule.config
    if "1-sqrt" in (cfg.decay_shape, cfg.cooldown_shape) or cfg.cooldown_shape == "inv-sqrt":
        return  # steep by design: unbounded slope where the decay starts
    lrs = [schedule.lr(step) for step in range(schedule.config.total_steps + 1)]
    largest_jump = max(abs(b - a) for a, b in zip(lrs, lrs[1:]))
    assert largest_jump <= 0.02 * schedule.max_lr


@pytest.mark.parametrize("shape", ["cosine", "inv-sqrt"])
def test_tiny_plateau_does_not_overflow(shape):
    """Found by hypothesis: a plateau ~1e-195 x the peak overflowed the inv-sqrt coefficient."""
    cfg = ScheduleConfig(name="infinite", warmup_steps=100, total_steps=400, cooldown_steps=100,
                         plateau_lr=2.28e-195, cooldown_shape=shape, anneal_steps=0)
    schedule = build_schedule(cfg, 0.0625, None)
    assert schedule.lr(100) == 0.0625 and schedule.lr(200) == 2.28e-195


def test_a_short_run_fits_its_warmup_and_warns_once():
    """torchtitan-style: train.max_steps=4 with the default 20 warmup steps just runs."""
    import subprocess
    import sys

    from tests.trainer.runs import REPO

    cfg = ScheduleConfig(name="cosine", total_steps=4, warmup_steps=20)
    assert cfg.fit_to_length() == [
        "schedule.warmup_steps (20) lowered to 3 to fit schedule.total_steps (4)"]
    assert cfg.warmup_steps == 3 and cfg.fit_to_length() == []
    build_schedule(cfg, MAX_LR)  # valid now
    wsd = ScheduleConfig(name="wsd", total_steps=10, warmup_steps=20, decay_fraction=0.5)
    wsd.fit_to_length()
    assert wsd.warmup_steps == 5
    infinite = ScheduleConfig(name="infinite", total_steps=50, warmup_steps=20, anneal_steps=10)
    assert len(infinite.fit_to_length()) == 1 and infinite.cooldown_steps == 20  # was 1000
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--dry-run",
                           "train.max_steps=4"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("schedule.warmup_steps (20) lowered to 3") == 1


def test_settings_no_length_fixes_are_still_refused():
    cfg = ScheduleConfig(name="cosine", total_steps=100, warmup_steps=-1)
    assert cfg.fit_to_length() == []
    with pytest.raises(ValueError, match=r"schedule.warmup_steps \(-1\) must be >= 0"):
        cfg.validate(MAX_LR)
