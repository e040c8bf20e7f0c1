"""Pipeline parallelism with torch.distributed.pipelining (torchtitan's pipeline_llama, in
small): the plain Llama is cut by layers into stages, the embedding on the first stage and the
final norm and head on the last; each stage keeps the plain model's parameter names
(`layers.5.attention.wq.weight` stays that), so checkpoints stay layout-free.

`pipeline_llama` is the PP step of parallelize (trainer/parallel/materialize.py): it splits the
meta-device model, then TP / AC / compile / FSDP2 and materialisation run per stage module, and
returns a `RankStages`: this rank's stages as one module with the plain names (what the
optimizer and the checkpoint see) plus the schedule that trains them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from trainer.data import IGNORE_INDEX
from trainer.model import Llama

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B,
             "GPipe": ScheduleGPipe}


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "Interleaved1F1B" else 1


def split_layers(n_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous layer ranges, as even as possible; earlier stages take the extra layers."""
    assert n_layers >= num_stages, (n_layers, num_stages)
    base, extra = divmod(n_layers, num_stages)
    bounds, start = [], 0
    for stage in range(num_stages):
        size = base + (stage < extra)
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def stage_module(model: Llama, stage: int, num_stages: int) -> Llama:
    """A copy of `model` holding only `stage`'s layers (and the embedding / head if first /
    last); parameter names unchanged. On the meta device the copy costs no memory."""
    keep = {str(i) for i in split_layers(model.cfg.n_layers, num_stages)[stage]}
    part = copy.deepcopy(model)
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    part.moe_blocks = {i: b for i, b in part.moe_blocks.items() if str(i) in keep}
    if stage > 0:
        part.tok_embeddings = None
    if stage < num_stages - 1:
        part.norm = None
        part.output = None
    return part


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
    """Next-token cross entropy in fp32, padding targets (IGNORE_INDEX) left out."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def build_pipeline(
    model: Llama,
    pp_group: torch.distributed.ProcessGroup,
    schedule: str,
    microbatches: int,
    device: torch.device,
    prepare: Callable[[Llama], nn.Module] = lambda module: module,
):
    """(schedule, this rank's stage modules). Stage s of V = pp x stages_per_rank lives on rank
    s % pp (the loop-around order interleaved 1F1B expects). `prepare` parallelises and
    materialises one stage module in place (the identity for a model that is ready)."""
    pp, rank = pp_group.size(), pp_group.rank()
    num_stages = pp * stages_per_rank(schedule)
    indices = range(rank, num_stages, pp)
    modules = [prepare(stage_module(model, s, num_stages)) for s in indices]
    stages = [PipelineStage(m, s, num_stages, device, group=pp_group)
              for m, s in zip(modules, indices)]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Each micro batch's mean, scaled so the accumulated gradient is the batch mean's.
        return token_loss(logits, targets) / microbatches

    cls = SCHEDULES[schedule]
    stage_arg = stages if cls is ScheduleInterleaved1F1B else stages[0]
    # scale_grads=False: loss_fn already divides by the micro-batch count.
    schedule_obj = cls(stage_arg, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_obj, modules


class RankStages(nn.Module):
    """This rank's pipeline stages as one module whose parameter names are the plain model's
    (the stages' submodules, shared, not copied): the optimizer, gradient clipping and the
    checkpoint layer see it like any other model. It trains only through `step`."""

    def __init__(self, schedule, modules: list[Llama], pp_group, device: torch.device,
                 hidden_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layers = nn.ModuleDict({k: v for m in modules for k, v in m.layers.items()})
        self.tok_embeddings = modules[0].tok_embeddings  # None unless this rank has stage 0
        self.norm, self.output = modules[-1].norm, modules[-1].output  # the last stage's
        self.schedule = schedule
        self.stage_modules = modules  # a plain list: not registered twice
        self.pp_group, self.device, self.hidden_dtype = pp_group, device, hidden_dtype
        self.dim = modules[0].cfg.dim

    @property
    def has_first(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def has_last(self) -> bool:
        return self.output is not None

    def forward(self, *args):
        raise RuntimeError("pipeline stages train through RankStages.step, not forward")

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one rank batch through the schedule; the summed micro-batch
        losses (the batch mean) on the last stage's rank, 0 on the others."""
        losses: list[torch.Tensor] = []
        args = (inputs.to(self.device),) if self.has_first else ()
        extra = {"target": targets.to(self.device), "losses": losses} if self.has_last else {}
        self.schedule.step(*args, return_outputs=False, **extra)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach() for loss in losses]).sum()

    @torch.no_grad()
    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Evaluation: the summed token loss of one batch, on every rank of the pipeline. The
        batch goes stage after stage (hidden states by send / recv, no micro batches):
        evaluation is rare, and the schedule's fixed micro-batch count need not divide it."""
        group, rank, pp = self.pp_group, self.pp_group.rank(), self.pp_group.size()
        num_stages = pp * len(self.stage_modules)
        hidden = torch.empty(*inputs.shape, self.dim, dtype=self.hidden_dtype, device=self.device)
        total = torch.zeros((), device=self.device)
        for stage in range(rank, num_stages, pp):  # stage s lives on rank s % pp
            if stage == 0:
                out = self.stage_modules[0](inputs.to(self.device))
            else:
                dist.recv(hidden, group=group, group_src=(stage - 1) % pp)
                out = self.stage_modules[stage // pp](hidden)
            if stage < num_stages - 1:
                dist.send(out.to(self.hidden_dtype).contiguous(), group=group,
                          group_dst=(stage + 1) % pp)
            else:
                total = token_loss(out, targets.to(self.device), reduction="sum")
        dist.all_reduce(total, group=group)  # 0 on all but the last stage's rank
        return total


def pipeline_llama(model: Llama, dims, schedule: str, microbatches: int, device: torch.device,
                   prepare: Callable[[Llama], nn.Module], hidden_dtype: torch.dtype) -> RankStages:
    """Split the (meta-device) `model` into this rank's stages over `dims["pp"]`, each prepared
    by `prepare` (parallelize + materialise), and the schedule over them. `hidden_dtype`: the
    dtype of the activations between stages."""
    pp_group = dims["pp"].get_group()
    schedule_obj, modules = build_pipeline(model, pp_group, schedule, microbatches, device,
                                           prepare)
    return RankStages(schedule_obj, modules, pp_group, device, hidden_dtype)
