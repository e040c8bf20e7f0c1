"""MoE health for the step line and metrics.jsonl: the aux and z losses and each expert's share
of the routed tokens, from the last micro batch of the step, over all data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.model import Llama


def moe_health(model: Llama, group: dist.ProcessGroup) -> dict:
    """{} for a dense model; else `moe_aux_loss`, `moe_z_loss` (summed over layers, rank mean),
    `moe_expert_share` ({layer: [share of expert 0, ...]}, summing to 1 per layer) and
    `moe_max_expert_share` (the busiest expert of any layer; 1/E is perfectly balanced)."""
    blocks = {i: b for i, b in model.moe_blocks.items() if b.tokens_per_expert is not None}
    if not blocks:
        return {}
    losses = torch.stack([
        sum(b.aux_loss.detach().float() for b in blocks.values()),
        sum(b.z_loss.detach().float() for b in blocks.values()),
    ])
    counts = torch.stack([b.tokens_per_expert.float() for b in blocks.values()])
    packed = torch.cat([losses / dist.get_world_size(group), counts.flatten()])
    dist.all_reduce(packed, group=group)  # one small collective: 2 + layers x experts floats
    counts = packed[2:].view_as(counts)
    shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return {
        "moe_aux_loss": packed[0].item(),
        "moe_z_loss": packed[1].item(),
        "moe_expert_share": {
            str(layer): [round(s, 4) for s in row] for layer, row in zip(blocks, shares.tolist())
        },
        "moe_max_expert_share": shares.max().item(),
    }
