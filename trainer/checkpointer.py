"""Where the trainer hands its state to the checkpoint layer: save, resume, warm start.

`Checkpointer` receives the `TrainState` (trainer/state.py) and moves it through
`checkpointing.CheckpointManager` (disk) and `Snapshots` (the memory tier). The layout records
of tensors whose saved form needs one (MoE experts stacked in one parameter) are declared here,
so the model itself knows nothing of checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from checkpointing import CheckpointDamaged, CheckpointManager, Stacked, resolve_checkpoint
from checkpointing.commit import is_checkpoint_dir
from checkpointing.torch_dcp import is_dcp_dir, load_dcp_into, resolve_dcp
from trainer.config import JobConfig
from trainer.distributed import say, seed_rng
from trainer.init_from import is_hf_source
from trainer.model.config import ModelConfig
from trainer.model.moe import EXPERT_WEIGHTS
from trainer.run_lock import ENV_FRESH
from trainer.snapshots import Preempted, Snapshots
from trainer.state import TrainState

HF_IMPORT_DIR = "hf-import"


def expert_layouts(cfg: ModelConfig) -> list[Stacked]:
    """Layout declarations for the stacked experts (`experts.w1 [E, hidden, dim]` ...)."""
    if not cfg.moe.enabled():
        return []
    return [Stacked(f"feed_forward.experts.{w}", cfg.moe.num_experts) for w in EXPERT_WEIGHTS]


class Checkpointer:
    def __init__(self, state: TrainState, cfg: JobConfig):
        self.state = state
        self.cfg = cfg
        self.last_saved_step = -1
        self.origin = f"initialised from seed {cfg.train.seed}"
        """What the run started from, for its start line (set by `restore`)."""
        self.rebuild_manager()
        self.snapshots = Snapshots(state, cfg.checkpoint, self.layouts)

    def rebuild_manager(self) -> None:
        """The manager, declaring the current (maybe grown) model's expert layouts."""
        ckpt = self.cfg.checkpoint
        self.layouts = expert_layouts(self.cfg.model)
        self.manager = (
            CheckpointManager(ckpt.dir, keep=ckpt.keep, layouts=self.layouts)
            if ckpt.enabled
            else None
        )

    # -- save -----------------------------------------------------------------------------
    def maybe_save(self) -> None:
        """After each step: stop on SIGTERM, snapshot when due, save when due."""
        if self.snapshots.preempted():
            say(f"SIGTERM: saving step {self.state.step} before exiting "
                f"(exit code {Preempted.CODE}: requeue)")
            self.save_final()
            raise Preempted()
        if self.snapshots.after_step():  # the keeper persists
            return
        due = self.state.step % self.cfg.checkpoint.persist_interval == 0
        if due and self.state.step != self.last_saved_step:  # mid-run growth saves its own step
            self.save()

    def save_final(self) -> None:
        if self.snapshots.finish():  # the keeper committed this step
            self.last_saved_step = self.state.step
        if self.state.step != self.last_saved_step:
            self.save(final=True)

    def save(self, final: bool = False) -> None:
        """A failed save (disk full) is a warning, not the end of training; the final one
        raises (the caller's work would be lost)."""
        if self.manager is None:
            return
        tensors, optim_json = self.state.tensors()
        state = self.state
        try:
            self.manager.save(state.step, tensors, state.global_state(optim_json),
                              state.rank_state())
        except (OSError, RuntimeError) as err:
            if final:
                raise
            say(f"warning: checkpoint of step {state.step} failed ({err}); training goes "
                f"on, the disk is at step {max(self.last_saved_step, 0)}")
            return
        self.last_saved_step = state.step

    # -- restore --------------------------------------------------------------------------
    def restore(self) -> int:
        """Resume this run from its newest loadable checkpoint; else warm-start from
        init.from; else start fresh. Returns the step training continues from."""
        if self.manager is not None:
            tensors, _ = self.state.tensors()
            result = self._resume(tensors)
            if result is not None:
                _report_skipped(result.skipped)
                self.state.load_tensors(tensors, result.global_state["optimizer"])
                self.state.resume(result, self.cfg.train.seed)
                self.last_saved_step = self.state.step
                say(f"resumed from {result.path} (step {self.state.step})")
                self.origin = f"continuing at step {self.state.step} ({result.path})"
                if self.cfg.init.from_:
                    say(f"init.from={self.cfg.init.from_} ignored: {self.cfg.checkpoint.dir} "
                        "already holds this run's checkpoints and a run resumes itself; "
                        "init.from starts new runs only (use a new run.dir)")
                return self.state.step
        if self.cfg.init.from_:
            self.warm_start(self.cfg.init.from_)
        seed_rng(self.cfg.train.seed, self.state.dist.rank, 0)
        return 0

    def _resume(self, tensors: dict):
        """The newest usable state of this run (memory or disk). State that is there but cannot
        be used stops the run, never a silent start from step 0, unless `--fresh` says so."""
        fresh = os.environ.get(ENV_FRESH) == "1"
        initial = {k: _local(v).clone() for k, v in tensors.items()} if fresh else {}
        try:
            result = self.snapshots.restore(tensors) or self.manager.load_latest(tensors)
            problems = self.snapshots.unusable() if result is None else []
        except CheckpointDamaged as err:
            result, problems = None, [str(err)]
        if not problems:
            return result
        if not fresh:
            raise ValueError(f"nothing usable to resume {self.cfg.run.dir} from: "
                             f"{'; '.join(problems)}; pass --fresh to start from scratch")
        say(f"--fresh: starting from scratch ({'; '.join(problems)})")
        for name, value in initial.items():  # a failed read may have filled some of them
            _local(tensors[name]).copy_(value)
        return None

    def warm_start(self, source: str) -> None:
        init = self.cfg.init
        if is_dcp_dir(source):
            return self._warm_start_dcp(source)
        if is_hf_source(source):
            path = self.import_hf(source)
        else:
            path = resolve_checkpoint(source)  # a clear error when there is none
            if not is_checkpoint_dir(Path(source)):
                path = Path(source)  # a run dir or root: its newest intact checkpoint
        tensors, _ = self.state.tensors(with_optimizer=init.load_optimizer)
        result = self.manager_for(path).load(path, tensors)
        _report_skipped(result.skipped)
        path = result.path
        saved = result.global_state
        self.state.load_tensors(tensors, saved["optimizer"] if init.load_optimizer else None)
        if init.load_schedule:
            self.state.schedule_offset = saved["schedule_offset"] + saved["step"]
            self.state.schedule.load_state_dict(saved["schedule"])
        self.state.phase = {
            "init_from": str(path),
            "source_step": saved["step"],
            "source_phase": saved.get("phase", {}),
        }
        what = "weights" + (" + optimizer" if init.load_optimizer else "")
        say(f"warm start: {what} from {path} (step {saved['step']})")
        self.origin = f"initialised from {path}"

    def _warm_start_dcp(self, source: str) -> None:
        """init.from a torch DCP checkpoint (torchtitan): its model weights, resharded by DCP."""
        if self.cfg.init.load_optimizer or self.cfg.init.load_schedule:
            raise ValueError(f"init.from={source} is a torch DCP checkpoint: only its weights "
                             "load; unset init.load_optimizer and init.load_schedule")
        tensors, _ = self.state.tensors(with_optimizer=False)
        step = load_dcp_into(source, tensors)
        self.state.load_tensors(tensors, None)
        path = resolve_dcp(source)
        self.state.phase = {"init_from": str(path), "source_step": step, "source_phase": {}}
        say(f"warm start: weights from torch DCP checkpoint {path} (step {step})")
        self.origin = f"initialised from {path}"

    def import_hf(self, hf_dir: str) -> Path:
        """A Hugging Face directory as a checkpoint in `<run.dir>/hf-import` (collective; as
        `perennial ckpt import`), so the warm start reads it like any checkpoint: each rank only
        its own shard. Reused if a crashed first attempt already committed it."""
        from trainer.model.hf_io import import_hf_checkpoint

        root = Path(self.cfg.run.dir) / HF_IMPORT_DIR
        try:
            return resolve_checkpoint(root)
        except ValueError:
            say(f"importing the Hugging Face model {hf_dir} into {root}")
            return import_hf_checkpoint(hf_dir, root)

    def newest(self) -> Path | None:
        """The newest committed checkpoint of this run (whoever wrote it: we or the keeper)."""
        try:
            return resolve_checkpoint(self.cfg.checkpoint.dir) if self.manager else None
        except ValueError:
            return None

    def manager_for(self, path: Path) -> CheckpointManager:
        return CheckpointManager(Path(path).parent, keep=1_000_000, layouts=self.layouts)


def _report_skipped(skipped) -> None:
    for path, reason in skipped:
        say(f"skipping checkpoint {path}: {reason}")


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value
