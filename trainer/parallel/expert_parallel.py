"""Expert parallelism: each MoE layer's stacked experts sharded on the expert dimension over
the `ep` sub-mesh, tokens dispatched to their expert's rank and back with all-to-all.

The `ep` ranks are taken from the data-parallel dimension (torchtitan's layout): the dp ranks
form a (dp_mod_ep, ep) grid, each ep group holds every expert once, and each rank still reads
its own data-parallel batch. The padded `[experts, rows, dim]` batch MoEFeedForward builds has a
static shape, so the all-to-all uses equal splits and nothing waits for the host: the rows for
this rank's experts arrive from every peer and are run as one `[local experts, ep x rows, dim]`
batch (Gshard/DeepSpeed-style fixed-size dispatch; torchtitan and Megatron instead exchange
exact counts, which needs a host sync per layer).

Parameters become DTensors `Shard(0)` on the ep mesh, so a saved expert tensor is one global
stacked tensor `[num_experts, ...]` whatever E: checkpoints reshard between EP degrees through
the ordinary box logic. Gradients of expert weights already sum the tokens of the whole ep
group, so they are scaled by 1 / ep and reduced over `dp_mod_ep` only (apply_fsdp).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from trainer.model.moe import GroupedExperts


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    for block in model.moe_blocks.values():
        block.expert_parallel = True
        block.experts.grad_scale = 1.0 / ep_mesh.size()  # see apply_fsdp
        distribute_module(
            block.experts,
            ep_mesh,
            partition_fn=_shard_experts,
            input_fn=_dispatch,
            output_fn=_combine,
        )


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [block.experts for block in model.moe_blocks.values()]


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]))
        module.register_parameter(param_name, sharded)


def _dispatch(module: nn.Module, inputs: tuple[torch.Tensor], mesh: DeviceMesh):
    """[E, rows, dim] on every rank -> [E / ep, ep x rows, dim]: this rank's experts' rows
    from every peer, peer-major."""
    (batch,) = inputs
    ep = mesh.size()
    experts, rows, dim = batch.shape
    received = all_to_all_single_autograd(batch.contiguous(), None, None, mesh)
    local = received.view(ep, experts // ep, rows, dim).transpose(0, 1)
    return local.reshape(experts // ep, ep * rows, dim)


def _combine(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The inverse of _dispatch: each peer's rows go home, back in [E, rows, dim] order."""
    ep = mesh.size()
    local_experts, ep_rows, dim = output.shape
    rows = ep_rows // ep
    per_peer = output.view(local_experts, ep, rows, dim).transpose(0, 1).contiguous()
    returned = all_to_all_single_autograd(per_peer.view(-1, rows, dim), None, None, mesh)
    return returned.view(local_experts * ep, rows, dim)
