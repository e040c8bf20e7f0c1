"""The Trainer: builds everything in pipeline order, then runs the step loop."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import JobConfig
from trainer.config_loader import save_config, to_yaml, validate_layout
from trainer.data import IGNORE_INDEX, build_data
from trainer.distributed import (
    DistInfo,
    all_reduce_mean,
    init_distributed,
    rng_state,
    set_rng_state,
)
from trainer.growth.midrun import adopt_grown_init, grow_trainer, model_config_for_resume
from trainer.health import HealthMonitor
from trainer.metrics import MetricsLogger, Throughput
from trainer.model import Llama
from trainer.moe_health import moe_health
from trainer.parallel.dims import ParallelDims
from trainer.parallel.grad_norm import clip_grad_norm_
from trainer.parallel.parallelize import parallelize_llama, set_gradient_sync
from trainer.schedule import build_schedule
from trainer.state import TrainState


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        validate_layout(cfg, self.dist.world_size)
        p = cfg.parallel
        self.dims = ParallelDims(self.dist.world_size, p.tp, p.strategy, ep=p.ep)
        self.dims.build_mesh(self.dist.device.type)
        self.is_main = self.dist.rank == 0
        self.build_data()
        adopted = adopt_grown_init(self.cfg)  # init.from a grown checkpoint: its shape
        if adopted:
            self._say_main(f"model shape from grown init.from: {', '.join(adopted)}")
        source_model = self.cfg.model
        self.cfg.model = model_config_for_resume(self.cfg)  # the grown model after grow.at_step
        self.will_grow = self.cfg.grow.at_step > 0 and self.cfg.model is source_model
        self.build_model()
        self.build_optimizer()
        self.build_schedule()
        self.state = TrainState(self)
        self.build_metrics()
        self.health = HealthMonitor.build(cfg, self.dist)

    # -- build, in pipeline order -------------------------------------------------------
    def build_data(self) -> None:
        t = self.cfg.train
        self.data = build_data(self.cfg.data, t.seed, t.global_batch_size, t.micro_batch_size)
        if not self.cfg.model.vocab_size:
            self.cfg.model.vocab_size = self.data.vocab_size

    def build_model(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        model = Llama(self.cfg.model)
        # Every rank initialises the full model from the same seed, so the weights are the
        # same whatever the layout; parallelize then keeps each rank's shard.
        model.init_weights(torch.Generator().manual_seed(self.cfg.train.seed))
        for layer in self.cfg.model.frozen_layers:  # e.g. after `grow stack --freeze-old`
            model.layers[str(layer)].requires_grad_(False)
        self.plain_model = model.to(self.dist.device)
        self.model = parallelize_llama(
            self.plain_model,
            self.dims,
            activation_checkpointing=self.cfg.train.activation_checkpointing,
            compile=self.cfg.train.compile,
            param_dtype=self.param_dtype,
        )

    @property
    def param_dtype(self) -> torch.dtype:
        precision = self.cfg.train.mixed_precision
        if precision == "auto":
            precision = "bf16" if self.dist.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def build_optimizer(self) -> None:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.deepspeed = None
        if self.cfg.parallel.strategy == "deepspeed":  # ZeRO wraps the model and our AdamW
            from trainer.parallel.deepspeed_backend import DeepSpeedBackend

            self.deepspeed = DeepSpeedBackend(self.cfg, self.model, self.optimizer,
                                              self.dist.world_size, self.param_dtype)
            self.model = self.deepspeed.engine

    def build_schedule(self) -> None:
        tokens_per_step = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        self.schedule = build_schedule(self.cfg.schedule, self.cfg.optim.lr, tokens_per_step)

    def build_metrics(self) -> None:
        self.metrics = MetricsLogger(
            self.cfg.run.dir, self.is_main, self.cfg.log, {"config": to_yaml(self.cfg)}
        )
        flops = self.plain_model.flops_per_token(self.cfg.data.seq_len)
        self.throughput = Throughput(flops, self.dist.world_size, self.dist.device)

    # -- run ------------------------------------------------------------------------------
    def train(self) -> None:
        if self.is_main:
            save_config(self.cfg, self.cfg.run.dir)
        resumed_step = self.state.restore()
        self.metrics.truncate_after(resumed_step)
        self.throughput.reset()
        max_steps = self.cfg.train.max_steps
        progress = self._progress_bar(resumed_step, max_steps)
        while self.state.step < max_steps:
            self.health.step_started(self.state.step + 1)
            record = self.train_step()
            self.state.step += 1
            progress.update(1)
            self.maybe_log(record)
            if self.will_grow and self.state.step == self.cfg.grow.at_step:
                self.grow()
            self.state.maybe_save()
            self.health.step_finished()
        progress.close()
        self.state.save_final()
        self.metrics.close()
        self.health.close()

    def grow(self) -> None:
        """Mid-run growth at this step boundary (trainer/growth/midrun.py), then a checkpoint."""
        grow_trainer(self)
        self.will_grow = False
        self._say_main(f"grew the model ({self.cfg.grow.kind}) at step {self.state.step}")
        self.state.save()

    def rebuild_for_growth(self) -> None:
        """Build, parallelize and optimize `cfg.model` again; the RNG streams are kept."""
        rng = rng_state(self.dist.device)
        self.build_model()
        self.build_optimizer()
        set_rng_state(rng, self.dist.device)
        self.state.rebuild_manager()
        self.throughput.flops_per_token = self.plain_model.flops_per_token(self.cfg.data.seq_len)

    def _say_main(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def train_step(self) -> dict:
        micro_batches = self.data.next_step_batches(self.dims.dp_rank(), self.dims.dp)
        lr = self.schedule.lr(self.state.schedule_offset + self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.deepspeed is not None:
            loss_sum, grad_norm = self.deepspeed.train_step(micro_batches, self.forward_loss)
        else:
            loss_sum, grad_norm = self._accumulate_and_step(micro_batches)
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        self.throughput.add(tokens)
        self.state.tokens_seen += tokens
        loss = all_reduce_mean(loss_sum, self.dims["dp"].get_group())
        health = moe_health(self.plain_model, self.dims["dp"].get_group())
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **health}

    def _accumulate_and_step(self, micro_batches) -> tuple[torch.Tensor, float]:
        loss_sum = torch.zeros((), device=self.dist.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            loss = self.forward_loss(inputs, targets) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.state.snapshots.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        inputs, targets = inputs.to(self.dist.device), targets.to(self.dist.device)
        with self._autocast():
            logits = self.model(inputs)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        if reduction == "mean" and self.cfg.model.moe.enabled():  # training, not evaluation
            loss = loss + self.plain_model.aux_loss()
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
        self.model.eval()
        losses = {}
        for name in self.data.source_names:
            totals = torch.zeros(2, device=self.dist.device)
            for inputs, targets in self.data.eval_batches(name, self.dims.dp_rank(), self.dims.dp):
                totals[0] += self.forward_loss(inputs, targets, reduction="sum")
                totals[1] += (targets != IGNORE_INDEX).sum()
            dist.all_reduce(totals, group=self.dims["dp"].get_group())
            if totals[1] > 0:
                losses[name] = (totals[0] / totals[1]).item()
        self.model.train()
        return losses

    def maybe_log(self, record: dict) -> None:
        step, cfg = self.state.step, self.cfg
        last = step == cfg.train.max_steps
        evaluate = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or last)
        if evaluate:
            record["eval_loss"] = self.evaluate()
        if step % cfg.train.log_interval and step != 1 and not last and not evaluate:
            return
        record = {"step": step, **record, **self.throughput.measure()}
        record["tokens_seen"] = self.state.tokens_seen
        record["tokens_by_source"] = dict(self.data.tokens_by_source)
        if cfg.data.record_sample_ids:
            record["sample_ids"] = list(self.data.last_sample_ids)
        self.metrics.log(record)

    def _progress_bar(self, start: int, total: int):
        from tqdm import tqdm

        enabled = self.is_main and self.cfg.log.progress and sys.stderr.isatty()
        return tqdm(initial=start, total=total, disable=not enabled, leave=False, unit="step")
