"""Everything a bitwise resume needs, and its trip through the checkpoint layer.

The trainer owns: model and optimizer tensors (keyed by the plain model's parameter names),
the schedule's parameters, the data stream's global cursor, per-rank RNG states and progress
(step, tokens, phase). `checkpointing` saves and reshards them; it knows nothing of the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from checkpointing import (
    CheckpointManager,
    SaveCadence,
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
    resolve_checkpoint,
)
from trainer.config_loader import to_yaml
from trainer.distributed import rng_state, seed_rng, set_rng_state
from trainer.model.moe import expert_layouts
from trainer.snapshots import Snapshots

if TYPE_CHECKING:
    from trainer.train import Trainer


class TrainState:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.step = 0
        self.tokens_seen = 0
        self.schedule_offset = 0
        """Steps of an earlier phase whose schedule this run continues (init.load_schedule)."""
        self.phase: dict = {}
        self.last_saved_step = -1
        self._config_yaml_text: str | None = None
        self.rebuild_manager()
        self.snapshots = Snapshots(self)

    # -- what gets saved ------------------------------------------------------------------
    def layout(self) -> dict:
        dims = self.trainer.dims
        return {
            "world_size": dims.world_size,
            "tp": dims.tp,
            "dp": dims.dp,
            "strategy": dims.strategy,
        }

    def tensors(self, with_optimizer: bool = True) -> tuple[dict, dict]:
        model, optim = self.trainer.model, self.trainer.optimizer
        if getattr(self.trainer, "deepspeed", None) is not None:  # ZeRO partitions as boxes
            return self.trainer.deepspeed.tensors(with_optimizer)
        tensors = model_tensors(model)
        optim_json: dict = {}
        if with_optimizer:
            optim_tensors, optim_json = optimizer_tensors(model, optim)
            tensors.update(optim_tensors)
        return tensors, optim_json

    def global_state(self, optim_json: dict) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "schedule_offset": self.schedule_offset,
            "phase": self.phase,
            "schedule": self.trainer.schedule.state_dict(),
            "data": self.trainer.data.state_dict(),
            "optimizer": optim_json,
            "layout": self.layout(),
            "config": self._config_yaml(),
        }

    def _config_yaml(self) -> str:
        """Rendered once (~20 ms, too much per snapshot); only growth changes the config."""
        if self._config_yaml_text is None:
            self._config_yaml_text = to_yaml(self.cfg)
        return self._config_yaml_text

    # -- save -----------------------------------------------------------------------------
    def maybe_save(self) -> None:
        if self.snapshots.after_step():  # the keeper persists
            return
        due = self.step % self.cfg.checkpoint.persist_interval == 0
        due = due or (self.cadence is not None and self.cadence.due(self.step))
        if due and self.step != self.last_saved_step:  # mid-run growth saves its own step
            self.save()

    def save_final(self) -> None:
        self.snapshots.finish()
        if self.step != self.last_saved_step:
            self.save(blocking=True)
        if self.manager is not None:
            self.manager.wait()

    def save(self, blocking: bool = False) -> None:
        """Save this step; non-blocking (the step pays the copy) unless `blocking`."""
        if self.manager is None:
            return
        tensors, optim_json = self.tensors()
        rank_state = {"rng": rng_state(self.trainer.dist.device)}
        args = (self.step, tensors, self.global_state(optim_json), rank_state)
        if blocking:
            self.manager.save(*args)
        else:
            self.cadence.save(*args)
        self.last_saved_step = self.step

    # -- mid-run growth (trainer/growth/midrun.py) -------------------------------------------
    def rebuild_manager(self) -> None:
        """The checkpoint manager, declaring the current (maybe grown) model's expert layouts."""
        ckpt = self.cfg.checkpoint
        if getattr(self, "manager", None) is not None:
            self.manager.wait()  # the pending save of the model before growth
        self.layouts = expert_layouts(self.cfg.model)
        self.manager = (
            CheckpointManager(ckpt.dir, keep=ckpt.keep, layouts=self.layouts)
            if ckpt.enabled
            else None
        )
        # Non-blocking saves' cadence; persist_interval alone when save_budget=0 (or with
        # memory snapshots, where the keeper persists and this cadence never runs).
        budget = 0 if ckpt.memory_snapshots() else ckpt.save_budget
        self.cadence = self.manager and SaveCadence(
            self.manager, budget, max_interval=ckpt.persist_interval
        )

    def apply_grown(self, tensors: dict, optim_json: dict) -> None:
        self._config_yaml_text = None  # the model section changed
        apply_model_tensors(self.trainer.model, tensors)
        apply_optimizer_tensors(self.trainer.model, self.trainer.optimizer, tensors, optim_json)

    # -- restore --------------------------------------------------------------------------
    def restore(self) -> int:
        """Resume this run from its newest loadable checkpoint; else warm-start from
        init.from; else start fresh. Returns the step training continues from."""
        if self.manager is not None:
            tensors, _ = self.tensors()
            result = self.snapshots.restore(tensors) or self.manager.load_latest(tensors)
            if result is not None:
                self._report_skipped(result.skipped)
                self._apply(result, tensors, full=True)
                self._say(f"resumed from {result.path} (step {self.step})")
                return self.step
        if self.cfg.init.from_:
            self._warm_start(self.cfg.init.from_)
        seed_rng(self.cfg.train.seed, self.trainer.dist.rank, 0)
        return 0

    def _warm_start(self, source: str) -> None:
        init = self.cfg.init
        path = resolve_checkpoint(source)
        tensors, _ = self.tensors(with_optimizer=init.load_optimizer)
        result = self.manager_for(path).load(path, tensors)
        self._apply(result, tensors, full=False)
        saved = result.global_state
        if init.load_schedule:
            self.schedule_offset = saved["schedule_offset"] + saved["step"]
            self.trainer.schedule.load_state_dict(saved["schedule"])
        self.phase = {
            "init_from": str(path),
            "source_step": saved["step"],
            "source_phase": saved.get("phase", {}),
        }
        what = "weights" + (" + optimizer" if init.load_optimizer else "")
        self._say(f"warm start: {what} from {path} (step {saved['step']})")

    def manager_for(self, path: Path) -> CheckpointManager:
        return CheckpointManager(Path(path).parent, keep=1_000_000, layouts=self.layouts)

    def _apply(self, result, tensors: dict, full: bool) -> None:
        model, optim = self.trainer.model, self.trainer.optimizer
        saved = result.global_state
        with_optimizer = full or self.cfg.init.load_optimizer
        if getattr(self.trainer, "deepspeed", None) is not None:
            self.trainer.deepspeed.apply(tensors, saved["optimizer"] if with_optimizer else {})
        else:
            apply_model_tensors(model, tensors)
            if with_optimizer:
                apply_optimizer_tensors(model, optim, tensors, saved["optimizer"])
        if not full:
            return
        self.step = saved["step"]
        self.last_saved_step = self.step
        self.tokens_seen = saved["tokens_seen"]
        self.schedule_offset = saved["schedule_offset"]
        self.phase = saved["phase"]
        self.trainer.schedule.load_state_dict(saved["schedule"])
        self.trainer.data.load_state_dict(saved["data"])
        self._restore_rng(saved["layout"], result.rank_states)

    def _restore_rng(self, saved_layout: dict, rank_states: list[dict]) -> None:
        rank = self.trainer.dist.rank
        if saved_layout == self.layout():
            set_rng_state(rank_states[rank]["rng"], self.trainer.dist.device)
        else:
            seed_rng(self.cfg.train.seed, rank, self.step)

    def _report_skipped(self, skipped) -> None:
        for path, reason in skipped:
            self._say(f"skipping checkpoint {path}: {reason}")

    def _say(self, message: str) -> None:
        self.trainer._say_main(message)
