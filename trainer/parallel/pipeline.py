"""Pipeline parallelism with torch.distributed.pipelining (torchtitan's pipeline_llama, in
small): the plain Llama is cut by layers into stages, the embedding on the first stage and the
final norm and head on the last; each stage keeps the plain model's parameter names
(`layers.5.attention.wq.weight` stays that), so checkpoints stay layout-free.

Not wired into the Trainer yet (no `parallel.pp` config key): this module and its test
(tests/trainer/parallel/test_pipeline.py) are the first half of issue 14's PP item.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

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
    last); parameter names unchanged."""
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


def build_pipeline(
    model: Llama,
    pp_group: torch.distributed.ProcessGroup,
    schedule: str,
    microbatches: int,
    device: torch.device,
):
    """(schedule, this rank's stage modules). Stage s of V = pp x stages_per_rank lives on rank
    s % pp (the loop-around order interleaved 1F1B expects)."""
    pp, rank = pp_group.size(), pp_group.rank()
    num_stages = pp * stages_per_rank(schedule)
    indices = range(rank, num_stages, pp)
    modules = [stage_module(model, s, num_stages) for s in indices]
    stages = [PipelineStage(m, s, num_stages, device, group=pp_group)
              for m, s in zip(modules, indices)]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Each micro batch's mean, scaled so the accumulated gradient is the batch mean's.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / microbatches

    cls = SCHEDULES[schedule]
    stage_arg = stages if cls is ScheduleInterleaved1F1B else stages[0]
    # scale_grads=False: loss_fn already divides by the micro-batch count.
    schedule_obj = cls(stage_arg, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_obj, modules
