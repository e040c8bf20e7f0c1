"""The Trainer: builds everything in pipeline order, then runs the step loop."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from trainer.checkpointer import Checkpointer
from trainer.config import JobConfig
from trainer.config_loader import save_config, save_config_or_warn, to_yaml, validate_layout
from trainer.data import IGNORE_INDEX, build_data
from trainer.distributed import (
    DistInfo,
    all_reduce_mean,
    init_distributed,
    rng_state,
    say,
    set_rng_state,
)
from trainer.growth.midrun import grow_trainer, model_config_for_resume
from trainer.health import HealthMonitor
from trainer.metrics import MetricsLogger, Throughput, duration
from trainer.moe_health import moe_health
from trainer.parallel.dims import ParallelDims
from trainer.parallel.grad_norm import clip_grad_norm_
from trainer.parallel.materialize import build_parallel_llama
from trainer.parallel.parallelize import set_gradient_sync
from trainer.parallel.pipeline import token_loss
from trainer.schedule import build_schedule
from trainer.state import TrainState


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        validate_layout(cfg, self.dist.world_size)
        p = cfg.parallel
        self.dims = ParallelDims(self.dist.world_size, p.tp, p.strategy, ep=p.ep, pp=p.pp)
        self.dims.build_mesh(self.dist.device.type)
        self.is_main = self.dist.rank == 0
        self.build_data()
        source_model = self.cfg.model
        self.cfg.model = model_config_for_resume(self.cfg)  # the grown model after grow.at_step
        self.will_grow = self.cfg.grow.at_step > 0 and self.cfg.model is source_model
        model, plain_model = self.build_model()
        optimizer, deepspeed, model = self.build_optimizer(model)
        dims = self.dims
        layout = {"world_size": dims.world_size, "tp": dims.tp, "dp": dims.dp,
                  "strategy": dims.strategy}
        if dims.pp_enabled:  # only then: pp=1 layouts stay those of earlier checkpoints
            layout["pp"] = dims.pp
        self.state = TrainState(
            model, plain_model, optimizer, self.build_schedule(), self.data, self.dist,
            layout=layout, config_yaml=to_yaml(cfg), deepspeed=deepspeed,
            stage_group=self.pp_group,
        )
        self.checkpointer = Checkpointer(self.state, cfg)
        self.build_metrics()
        self.health = HealthMonitor.build(cfg, self.dist)

    # -- build, in pipeline order -------------------------------------------------------
    def build_data(self) -> None:
        t = self.cfg.train
        micro = t.micro_batch_for(self.dims.dp)
        self.data = build_data(self.cfg.data, t.seed, t.global_batch_size, micro,
                               self.cfg.model.vocab_size, self.dist.device.type == "cuda")
        if not self.cfg.model.vocab_size:
            self.cfg.model.vocab_size = self.data.vocab_size

    def build_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(parallelized, plain) model: built on the meta device, parallelised, then each rank
        materialises and initialises only its shard; the values do not depend on the layout
        (trainer/parallel/materialize.py)."""
        plain_model, parallel_model = build_parallel_llama(
            self.cfg, self.dims, self.dist.device, self.param_dtype
        )
        return parallel_model, plain_model

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The pipeline group (ranks holding the other stages), None without PP."""
        return self.dims["pp"].get_group() if self.dims.pp_enabled else None

    @property
    def param_dtype(self) -> torch.dtype:
        precision = self.cfg.train.mixed_precision
        if precision == "auto":
            precision = "bf16" if self.dist.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def build_optimizer(self, model):
        """(optimizer, DeepSpeed backend or None, the model to train: `model` or its engine)."""
        o = self.cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        if self.cfg.parallel.strategy != "deepspeed":
            return optimizer, None, model
        from trainer.parallel.deepspeed_backend import DeepSpeedBackend

        # ZeRO wraps the model and our AdamW
        deepspeed = DeepSpeedBackend(self.cfg, model, optimizer, self.dist.world_size,
                                     self.param_dtype)
        return optimizer, deepspeed, deepspeed.engine

    def build_schedule(self):
        tokens_per_step = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        return build_schedule(self.cfg.schedule, self.cfg.optim.lr, tokens_per_step)

    def build_metrics(self) -> None:
        max_steps = self.cfg.train.max_steps
        self.metrics = MetricsLogger(self.cfg.run.dir, self.is_main, self.cfg.log,
                                     {"config": to_yaml(self.cfg)}, max_steps,
                                     run_name=self.cfg.run.name)
        flops = self.state.plain_model.flops_per_token(self.cfg.data.seq_len)
        self.throughput = Throughput(flops, self.dist.world_size, self.dist.device, max_steps)

    # -- run ------------------------------------------------------------------------------
    def train(self) -> None:
        resumed_step = self.checkpointer.restore()
        # After a restore that worked (a failed resume keeps the old record); a full disk
        # makes it a warning, written again once the disk has room.
        if self.is_main and not save_config_or_warn(self.cfg, self.cfg.run.dir, resumed_step):
            self.metrics.retry_later(lambda: save_config(self.cfg, self.cfg.run.dir, resumed_step))
        self.metrics.truncate_after(resumed_step)
        self.throughput.reset()
        max_steps = self.cfg.train.max_steps
        if resumed_step >= max_steps:
            say(f"nothing to train: {self.cfg.run.dir} is already at step {resumed_step} "
                f"(train.max_steps={max_steps}); raise train.max_steps to continue it")
        else:
            say(self.start_line())
        progress = self._progress_bar(resumed_step, max_steps)
        while self.state.step < max_steps:
            self.health.step_started(self.state.step + 1)
            record = self.train_step()
            self.state.step += 1
            progress.update(1)
            self.maybe_log(record)
            if self.will_grow and self.state.step == self.cfg.grow.at_step:
                self.grow()
            self.checkpointer.maybe_save()
            self.health.step_finished()
        progress.close()
        self.checkpointer.save_final()
        if resumed_step < max_steps:
            say(f"done: step {self.state.step}/{max_steps} in "
                f"{duration(self.throughput.measure()['elapsed_s'])}; newest checkpoint: "
                f"{self.checkpointer.newest() or 'none (checkpoint.enabled=false)'}")
        self.metrics.close()
        self.health.close()

    def start_line(self) -> str:
        t, state = self.cfg.train, self.state
        layout = ", ".join(f"{key}={value}" for key, value in state.layout.items())
        return (f"start: {state.plain_model.num_params():,} parameters, "
                f"{t.global_batch_size * self.cfg.data.seq_len:,} tokens/step "
                f"({t.global_batch_size} x {self.cfg.data.seq_len}), layout {layout}, "
                f"run dir {self.cfg.run.dir}, {self.checkpointer.origin}")

    def grow(self) -> None:
        """Mid-run growth at this step boundary (trainer/growth/midrun.py), then a checkpoint."""
        grow_trainer(self)
        self.will_grow = False
        say(f"grew the model ({self.cfg.grow.kind}) at step {self.state.step}")
        self.checkpointer.save()

    def rebuild_for_growth(self) -> None:
        """Build, parallelize and optimize `cfg.model` again; the RNG streams are kept."""
        rng = rng_state(self.dist.device)
        model, plain_model = self.build_model()
        optimizer, deepspeed, model = self.build_optimizer(model)
        set_rng_state(rng, self.dist.device)
        self.state.replace_model(model, plain_model, optimizer, deepspeed, to_yaml(self.cfg))
        self.checkpointer.rebuild_manager()
        self.throughput.flops_per_token = plain_model.flops_per_token(self.cfg.data.seq_len)

    def train_step(self) -> dict:
        micro_batches = self.data.next_step_batches(self.dims.dp_rank(), self.dims.dp)
        state = self.state
        lr = state.schedule.lr(state.schedule_offset + state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        if state.deepspeed is not None:
            loss_sum, grad_norm = state.deepspeed.train_step(micro_batches, self.forward_loss)
        elif self.dims.pp_enabled:
            loss_sum, grad_norm = self._pipeline_step(micro_batches)
        else:
            loss_sum, grad_norm = self._accumulate_and_step(micro_batches)
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        self.throughput.add(tokens)
        self.state.tokens_seen += tokens
        loss = all_reduce_mean(loss_sum, self.dims["dp"].get_group())
        health = moe_health(self.state.plain_model, self.dims["dp"].get_group())
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **health}

    def _accumulate_and_step(self, micro_batches) -> tuple[torch.Tensor, float]:
        loss_sum = torch.zeros((), device=self.dist.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.state.model, index == len(micro_batches) - 1)
            loss = self.forward_loss(inputs, targets) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum, self._clip_and_step()

    def _pipeline_step(self, micro_batches) -> tuple[torch.Tensor, float]:
        """The rank batch through the pipeline schedule (it splits it into
        parallel.pp_microbatches); the loss, known on the last stage, summed over the stages."""
        inputs = torch.cat([inputs for inputs, _ in micro_batches])
        targets = torch.cat([targets for _, targets in micro_batches])
        with self._autocast():
            loss_sum = self.state.model.step(inputs, targets)
        dist.all_reduce(loss_sum, group=self.pp_group)  # 0 on all but the last stage
        return loss_sum, self._clip_and_step()

    def _clip_and_step(self) -> float:
        """Global-norm clipping (over the stages too), then the optimizer step."""
        grad_norm = clip_grad_norm_(self.state.model.parameters(), self.cfg.train.grad_clip,
                                    pp_group=self.pp_group)
        self.checkpointer.snapshots.before_optimizer_step()
        self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        inputs, targets = inputs.to(self.dist.device), targets.to(self.dist.device)
        with self._autocast():
            logits = self.state.model(inputs)
        loss = token_loss(logits, targets, reduction)
        if reduction == "mean" and self.cfg.model.moe.enabled():  # training, not evaluation
            loss = loss + self.state.plain_model.aux_loss()
        return loss

    def _autocast(self):
        # FSDP2 casts parameters itself (MixedPrecisionPolicy); otherwise autocast does.
        if self.param_dtype == torch.float32 or self.dims.fsdp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.param_dtype)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss per source: token-weighted over the whole data-parallel group (ranks
        may hold padding only, so sums and counts are reduced, not per-rank means)."""
        self.state.model.eval()
        losses = {}
        for name in self.data.source_names:
            totals = torch.zeros(2, device=self.dist.device)
            for inputs, targets in self.data.eval_batches(name, self.dims.dp_rank(), self.dims.dp):
                totals[0] += self.eval_loss_sum(inputs, targets)
                totals[1] += (targets != IGNORE_INDEX).sum()
            dist.all_reduce(totals, group=self.dims["dp"].get_group())
            if totals[1] > 0:
                losses[name] = (totals[0] / totals[1]).item()
        self.state.model.train()
        return losses

    def eval_loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.dims.pp_enabled:
            with self._autocast():
                return self.state.model.loss_sum(inputs, targets)
        return self.forward_loss(inputs, targets, reduction="sum")

    def maybe_log(self, record: dict) -> None:
        step, cfg = self.state.step, self.cfg
        last = step == cfg.train.max_steps
        evaluate = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or last)
        if evaluate:
            record["eval_loss"] = self.evaluate()
        if step % cfg.train.log_interval and step != 1 and not last and not evaluate:
            return
        record = {"step": step, **record, **self.throughput.measure(step)}
        record["tokens_seen"] = self.state.tokens_seen
        record.update(self.checkpointer.snapshots.counters())  # skipped snapshots: never silent
        record["tokens_by_source"] = dict(self.data.tokens_by_source)
        if cfg.data.record_sample_ids:
            record["sample_ids"] = list(self.data.last_sample_ids)
        self.metrics.log(record)

    def _progress_bar(self, start: int, total: int):
        from tqdm import tqdm

        enabled = self.is_main and self.cfg.log.progress and sys.stderr.isatty()
        return tqdm(initial=start, total=total, disable=not enabled, leave=False, unit="step")
