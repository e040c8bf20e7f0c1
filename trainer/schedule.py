"""Learning-rate schedules: pure functions of the step within the current training phase.

Step convention (torchtitan's): ``lr(step)`` is the LR of the optimizer step with 0-based index
``step`` in this phase. Warmup is linear in (step + 1) / (warmup_steps + 1): it leaves ``init_lr``
at the virtual step -1 (the previous phase's last step when re-warming), so the first optimizer
step already gets a non-zero LR, and ``lr(warmup_steps)`` is exactly the peak. Decays end exactly
at ``step == total_steps``; later steps hold the final LR.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

LrFn = Callable[[int], float]
SCHEDULES = ("constant", "cosine", "wsd", "infinite", "power")
# Decay factor: 1 at progress 0, 0 at progress 1.
_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}
CHOICES = {"decay_shape": tuple(_DECAY_SHAPES), "cooldown_shape": ("cosine", "inv-sqrt"),
           "power_unit": ("tokens", "steps")}
_NON_NEGATIVE = ("warmup_steps", "min_lr", "init_lr", "cooldown_steps", "plateau_lr",
                 "anneal_steps", "power_offset")
_COMMON = ("name", "warmup_steps", "total_steps", "init_lr")
_ANNEAL = ("anneal_steps", "min_lr", "decay_shape")
# The fields that shape each schedule: only these are validated and compared on resume.
RELEVANT_FIELDS = {
    "constant": _COMMON,
    "cosine": (*_COMMON, "min_lr"),
    "wsd": (*_COMMON, "min_lr", "decay_fraction", "decay_shape"),
    "infinite": (*_COMMON, "cooldown_steps", "cooldown_shape", "plateau_lr", *_ANNEAL),
    "power": (*_COMMON, "power_a", "power_b", "power_unit", "power_offset", *_ANNEAL),
}


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """constant | cosine | wsd | infinite | power. The peak LR is optim.lr."""
    warmup_steps: int = 20
    """Linear warmup from init_lr; lr(warmup_steps) is exactly the peak."""
    total_steps: int | None = None
    """Schedule length in optimizer steps (Megatron lr_decay_iters). None = train.max_steps, so
    a run can stop early and resume on the same curve. Later steps hold the final LR."""
    min_lr: float = 3e-5
    """Absolute LR at the end of the decay (cosine, wsd) or of the anneal (infinite, power)."""
    init_lr: float = 0.0
    """Warmup start (Megatron lr_warmup_init); to re-warm, the previous phase's final_lr."""
    decay_fraction: float = 0.2
    """wsd: share of total_steps spent in the final decay, in (0, 1] (torchtitan decay_ratio)."""
    decay_shape: str = "linear"
    """Shape of the wsd decay and of the infinite/power anneal: linear | cosine | 1-sqrt."""
    cooldown_steps: int = 1000
    """infinite: steps after warmup spent cooling down from optim.lr to plateau_lr."""
    cooldown_shape: str = "cosine"
    """infinite: cosine | inv-sqrt (optim.lr / sqrt(1 + alpha * k), landing on plateau_lr)."""
    plateau_lr: float = 1.5e-4
    """infinite: absolute constant LR held after the cooldown, at most optim.lr."""
    anneal_steps: int = 0
    """infinite, power: anneal to min_lr over the last anneal_steps of total_steps; 0 = none."""
    power_a: float = 4.6
    """power: lr = min(optim.lr, power_a * n ** power_b). Shen et al. (2024) scale the
    coefficient by the batch size (lr = batch_size * a * n^b): pass that product here."""
    power_b: float = -0.51
    """power: exponent of the power law, < 0."""
    power_unit: str = "tokens"
    """power: what n counts: tokens (step * tokens_per_step) | steps."""
    power_offset: int = 0
    """power: n already trained before this phase, so a continued run resumes the power law."""

    def validate(self, max_lr: float) -> None:
        """Raises ValueError naming every bad ``schedule.*`` key; total_steps must be resolved."""
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name ({self.name!r}) must be one of {', '.join(SCHEDULES)}")
        if self.total_steps is None:
            raise ValueError("schedule.total_steps is unset: resolve it from train.max_steps")
        t, w, a = self.total_steps, self.warmup_steps, self.anneal_steps
        checks = [
            ("name", max_lr > 0 and math.isfinite(max_lr), f"optim.lr ({max_lr}) must be > 0"),
            ("name", w < t, f"schedule.warmup_steps ({w}) must be < schedule.total_steps ({t})"),
        ]
        v = vars(self)
        checks += [(k, math.isfinite(v[k]) and v[k] >= 0, f"schedule.{k} ({v[k]}) must be >= 0")
                   for k in _NON_NEGATIVE]
        checks += [(k, v[k] <= max_lr, f"schedule.{k} ({v[k]}) must be <= optim.lr ({max_lr})")
                   for k in ("min_lr", "init_lr", "plateau_lr")]
        checks += [(k, v[k] in allowed, f"schedule.{k} ({v[k]!r}) must be one of "
                    f"{', '.join(allowed)}") for k, allowed in CHOICES.items()]
        decay_start = t * (1 - self.decay_fraction)
        phases = w + a + (self.cooldown_steps if self.name == "infinite" else 0)
        checks += [
            ("decay_fraction", 0 < self.decay_fraction <= 1,
             f"schedule.decay_fraction ({self.decay_fraction}) must be in (0, 1]"),
            ("decay_fraction", decay_start >= w, f"schedule.warmup_steps ({w}) must be <= the "
             f"decay start schedule.total_steps * (1 - schedule.decay_fraction) ({decay_start:g})"),
            ("anneal_steps", phases <= t, f"schedule.warmup_steps + cooldown_steps + anneal_steps "
             f"({phases}) must be <= schedule.total_steps ({t})"),
            ("plateau_lr", a == 0 or self.plateau_lr >= self.min_lr, f"schedule.plateau_lr "
             f"({self.plateau_lr}) must be >= schedule.min_lr ({self.min_lr}) to anneal to it"),
            ("plateau_lr", self.cooldown_shape != "inv-sqrt" or self.plateau_lr > 0,
             "schedule.plateau_lr must be > 0 with schedule.cooldown_shape 'inv-sqrt'"),
            ("power_a", math.isfinite(self.power_a) and self.power_a > 0,
             f"schedule.power_a ({self.power_a}) must be > 0"),
            ("power_b", math.isfinite(self.power_b) and self.power_b < 0,
             f"schedule.power_b ({self.power_b}) must be < 0"),
        ]
        relevant = RELEVANT_FIELDS[self.name]
        if problems := [message for key, ok, message in checks if key in relevant and not ok]:
            raise ValueError("invalid LR schedule: " + "; ".join(problems))

    def fit_to_length(self) -> list[str]:
        """Shorten the warmup (and the infinite schedule's cooldown and the anneal) to fit
        total_steps, as torchtitan clamps its warmup, so `train.max_steps=4` just runs; returns
        one warning per value changed. Values no length can fix stay for `validate` to refuse."""
        t, notes = self.total_steps, []
        if t is None or t < 1 or not all(getattr(self, k) >= 0 for k in _NON_NEGATIVE):
            return notes
        fits = t - 1
        if self.name == "wsd" and 0 < self.decay_fraction <= 1:
            fits = min(fits, math.floor(t * (1 - self.decay_fraction)))
        self._clamp("warmup_steps", max(fits, 0), notes)
        if self.name in ("infinite", "power"):
            self._clamp("anneal_steps", t - self.warmup_steps, notes)
        if self.name == "infinite":
            self._clamp("cooldown_steps", t - self.warmup_steps - self.anneal_steps, notes)
        return notes

    def _clamp(self, key: str, most: int, notes: list[str]) -> None:
        value = getattr(self, key)
        if value > most:
            setattr(self, key, most)
            notes.append(f"schedule.{key} ({value}) lowered to {most} to fit "
                         f"schedule.total_steps ({self.total_steps})")


ConfigLike = ScheduleConfig | DictConfig | Mapping[str, Any]


def as_schedule_config(cfg: ConfigLike) -> ScheduleConfig:
    if isinstance(cfg, ScheduleConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    known = {f.name for f in fields(ScheduleConfig)}
    if unknown := sorted(set(cfg) - known):
        raise ValueError(f"unknown keys {['schedule.' + k for k in unknown]}; "
                         f"valid: {', '.join(sorted(known))}")
    return ScheduleConfig(**cfg)


def _decay(start_lr: float, end_lr: float, shape: str, progress: float) -> float:
    """Goes from start_lr at progress 0 to end_lr at progress 1, both exactly."""
    if progress <= 0 or progress >= 1:
        return start_lr if progress <= 0 else end_lr
    return end_lr + (start_lr - end_lr) * _DECAY_SHAPES[shape](progress)


def _with_anneal(cfg: ScheduleConfig, main: LrFn) -> LrFn:
    anneal_steps = cfg.anneal_steps
    anneal_start = cfg.total_steps - anneal_steps
    if anneal_steps == 0:
        return main
    start_lr = main(anneal_start)
    if start_lr < cfg.min_lr:
        raise ValueError(f"schedule.min_lr ({cfg.min_lr}) is above the LR where the anneal "
                         f"starts ({start_lr:.3g} at step {anneal_start})")

    def lr_at(step: int) -> float:
        if step <= anneal_start:
            return main(step)
        return _decay(start_lr, cfg.min_lr, cfg.decay_shape, (step - anneal_start) / anneal_steps)

    return lr_at


def _cooldown_then_plateau(cfg: ScheduleConfig, max_lr: float) -> LrFn:
    w, steps, plateau = cfg.warmup_steps, cfg.cooldown_steps, cfg.plateau_lr
    # inv-sqrt: max_lr / sqrt(1 + alpha * k) lands on the plateau at k == cooldown_steps.
    ratio = max_lr / plateau if plateau > 0 else 1.0
    # A plateau ~1e-150 x max_lr or lower would overflow the square: the drop is then immediate.
    alpha = (ratio**2 - 1) / max(steps, 1) if ratio < 1e150 else math.inf

    def lr_at(step: int) -> float:
        if step >= w + steps:
            return plateau
        if cfg.cooldown_shape == "inv-sqrt":
            k = step - w
            return max(plateau, max_lr / math.sqrt(1 + alpha * k)) if k else max_lr
        return _decay(max_lr, plateau, "cosine", (step - w) / steps)

    return lr_at


def _power_law(cfg: ScheduleConfig, max_lr: float, tokens_per_step: int | None) -> LrFn:
    if cfg.power_unit == "tokens" and not (tokens_per_step and tokens_per_step > 0):
        raise ValueError("schedule.power_unit 'tokens' needs tokens_per_step > 0 "
                         f"(global batch x sequence length), got {tokens_per_step}")
    unit = tokens_per_step if cfg.power_unit == "tokens" else 1

    def lr_at(step: int) -> float:
        n = cfg.power_offset + step * unit
        return max_lr if n <= 0 else min(max_lr, cfg.power_a * n**cfg.power_b)

    return lr_at


def _main_phase(cfg: ScheduleConfig, max_lr: float, tokens_per_step: int | None) -> LrFn:
    """The schedule after warmup: steps warmup_steps .. total_steps."""
    w, t = cfg.warmup_steps, cfg.total_steps
    if cfg.name == "constant":
        return lambda step: max_lr
    if cfg.name == "cosine":
        return lambda step: _decay(max_lr, cfg.min_lr, "cosine", (step - w) / (t - w))
    if cfg.name == "wsd":
        start = t * (1 - cfg.decay_fraction)
        shape = cfg.decay_shape
        return lambda step: _decay(max_lr, cfg.min_lr, shape, (step - start) / (t - start))
    if cfg.name == "infinite":
        return _with_anneal(cfg, _cooldown_then_plateau(cfg, max_lr))
    return _with_anneal(cfg, _power_law(cfg, max_lr, tokens_per_step))


@dataclass(frozen=True)
class Schedule:
    """lr(step) takes the trainer's own phase step, never one read back from param groups."""

    config: ScheduleConfig
    max_lr: float
    tokens_per_step: int | None
    lr_at: LrFn

    def lr(self, step: int) -> float:
        assert step >= 0, f"negative step {step}"
        lr = self.lr_at(min(step, self.config.total_steps))
        assert math.isfinite(lr) and 0.0 <= lr <= self.max_lr, (step, lr)
        return lr

    @property
    def final_lr(self) -> float:
        """The LR this phase ends at: the init_lr of a re-warming continuation."""
        return self.lr(self.config.total_steps)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the parameters that shape the curve, under their config keys."""
        cfg = self.config
        state = {f"schedule.{k}": getattr(cfg, k) for k in RELEVANT_FIELDS[cfg.name]}
        state["optim.lr"] = self.max_lr
        if cfg.name == "power" and cfg.power_unit == "tokens":
            state["tokens_per_step"] = self.tokens_per_step
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = False) -> list[str]:
        """Logs (raises if strict) and returns how the checkpoint's schedule differs."""
        new = self.state_dict()
        changes = [f"{key}: {state.get(key)!r} -> {new.get(key)!r}"
                   for key in dict.fromkeys([*state, *new]) if state.get(key) != new.get(key)]
        if changes and strict:
            raise ValueError("LR schedule changed since the checkpoint:\n  " + "\n  ".join(changes))
        if changes:
            logger.warning("LR schedule changed since the checkpoint: %s", "; ".join(changes))
        return changes


def build_schedule(cfg: ConfigLike, max_lr: float, tokens_per_step: int | None = None) -> Schedule:
    cfg = as_schedule_config(cfg)
    cfg.validate(max_lr)
    main = _main_phase(cfg, max_lr, tokens_per_step)
    peak = main(cfg.warmup_steps)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.init_lr + (peak - cfg.init_lr) * (step + 1) / (cfg.warmup_steps + 1)
        return main(step)

    return Schedule(cfg, max_lr, tokens_per_step, lr_at)


def describe_schedule(cfg: ConfigLike, max_lr: float) -> str:
    """A few lines: each phase with its step range."""
    c = as_schedule_config(cfg)
    c.validate(max_lr)
    w, t, a = c.warmup_steps, c.total_steps, c.anneal_steps
    phases = [(0, w, f"linear warmup {c.init_lr:g} -> peak")] if w else []
    if c.name == "constant":
        phases.append((w, t, f"constant {max_lr:g}"))
    elif c.name == "cosine":
        phases.append((w, t, f"cosine decay {max_lr:g} -> {c.min_lr:g}"))
    elif c.name == "wsd":
        start = t * (1 - c.decay_fraction)
        phases.append((w, start, f"stable {max_lr:g}"))
        phases.append((start, t, f"{c.decay_shape} decay -> {c.min_lr:g}"))
    elif c.name == "infinite":
        plateau_start = w + c.cooldown_steps
        phases.append((w, plateau_start, f"{c.cooldown_shape} cooldown -> {c.plateau_lr:g}"))
        phases.append((plateau_start, t - a, f"plateau {c.plateau_lr:g}"))
    else:
        phases.append((w, t - a, f"min({max_lr:g}, {c.power_a:g} * n^{c.power_b:g}), "
                                 f"n = {c.power_offset} + {c.power_unit} trained"))
    if a and c.name in ("infinite", "power"):
        phases.append((t - a, t, f"{c.decay_shape} anneal -> {c.min_lr:g}"))
    lines = [f"{c.name} LR schedule: {t} steps, peak optim.lr {max_lr:g}"]
    lines += [f"  steps {start:g}..{end:g}: {what}" for start, end, what in phases]
    return "\n".join([*lines, f"  after step {t}: hold the final LR"])


def lr_curve(cfg: ConfigLike, max_lr: float, total_steps: int,
             tokens_per_step: int | None = None) -> list[float]:
    """LRs of the steps 0 .. total_steps - 1 of a run; cfg.total_steps None means total_steps."""
    cfg = as_schedule_config(cfg)
    if cfg.total_steps is None:
        cfg = replace(cfg, total_steps=total_steps)
    schedule = build_schedule(cfg, max_lr, tokens_per_step)
    return [schedule.lr(step) for step in range(total_steps)]


def plot_schedule(curves: Mapping[str, Sequence[float] | Schedule] | Sequence[Any],
                  out_png: str | os.PathLike, title: str | None = None) -> None:
    """Plots labelled curves or Schedules (a bare list gets numbered labels) into a PNG."""
    from matplotlib.figure import Figure  # lazy: no GUI backend, no pyplot global state

    if not isinstance(curves, Mapping):
        curves = {f"schedule {i}": curve for i, curve in enumerate(curves)}
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        if isinstance(curve, Schedule):
            curve = [curve.lr(step) for step in range(curve.config.total_steps + 1)]
        ax.plot(range(len(curve)), curve, label=label)
    ax.set(xlabel="step", ylabel="learning rate", title=title or "LR schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(os.fspath(out_png), dpi=120)
