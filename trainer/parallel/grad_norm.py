"""Gradient-norm clipping that works for plain tensors and DTensors on different meshes.

`torch.nn.utils.clip_grad_norm_` stacks the per-parameter norms, which fails when a 2-D
FSDP×TP model mixes DTensors on the (dp, tp) mesh with norm weights on the dp mesh alone
(torchtitan hits the same thing). Here the norm is reduced per mesh group and combined.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _group_key(grad: torch.Tensor) -> object:
    if isinstance(grad, DTensor):
        return (id(grad.device_mesh), tuple(grad.placements))
    return None


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter], max_norm: float, pp_group=None
) -> float:
    """Clip gradients in place to a global L2 norm of `max_norm` (0 = no clipping) and
    return the norm before clipping. `pp_group`: the pipeline group whose other stages hold
    the rest of the parameters (their squared norms are summed over it)."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        groups[_group_key(grad)].append(grad)
    squared = 0.0
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared += float(norm) ** 2
    if pp_group is not None:
        across = torch.tensor(squared, dtype=torch.float64)
        torch.distributed.all_reduce(across, group=pp_group)
        squared = float(across)
    total = math.sqrt(squared)
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return total
