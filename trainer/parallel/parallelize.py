"""Turn a plain model into a parallel one, in one fixed order.

0. Pipeline parallelism (trainer/parallel/pipeline.py, called from materialize.py): the model
   is split into stage modules by layers first; steps 1-4 then run on each stage module.
1. Tensor parallelism: parameters become DTensors sharded over the `tp` sub-mesh. It goes
   first because FSDP2 must then shard those DTensors again over `dp` (a 2-D layout).
2. Activation checkpointing: wraps whole blocks, after TP, so the recomputed forward runs the
   TP-sharded modules.
3. torch.compile per block, after checkpointing, so each compiled region includes it.
1b. Expert parallelism (trainer/parallel/expert_parallel.py): MoE experts sharded on the
   expert dimension over `ep`, tokens moved by all-to-all.
4. Data parallelism last: FSDP2 `fully_shard` per block and then the root (each block's
   all-gather overlaps the previous block's compute), or DDP over the `dp` sub-mesh; none when
   there is a single data-parallel rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel.dims import ParallelDims
from trainer.parallel.expert_parallel import apply_ep, expert_modules


def parallelize_llama(
    model: nn.Module,
    dims: ParallelDims,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    if dims.tp_enabled:
        apply_tp(model, dims["tp"])
    if dims.ep_enabled:
        apply_ep(model, dims["ep"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, param_dtype)
    elif dims.ddp_enabled:
        return apply_ddp(model, dims["dp"])
    return model


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style column/row sharding: q/k/v and w1/w3 split the heads / hidden units,
    wo and w2 reduce; embedding and output split the vocabulary and return replicated
    activations, so norms and the loss need no change."""
    edges = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    # A pipeline stage may hold neither (trainer/parallel/pipeline.py).
    edges = {name: style for name, style in edges.items() if getattr(model, name) is not None}
    if edges:
        parallelize_module(model, tp_mesh, edges)
    attention_plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
    }
    dense_ffn_plan = {
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.values():
        # MoE feed-forwards (router + stacked experts) stay replicated over tp: every tp rank
        # computes the same expert outputs from the replicated activations.
        is_moe = hasattr(block.feed_forward, "experts")
        plan = attention_plan if is_moe else {**attention_plan, **dense_ffn_plan}
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: nn.Module) -> None:
    for name, block in model.layers.items():
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block, fullgraph=True)


def apply_fsdp(model: nn.Module, dims: ParallelDims, param_dtype: torch.dtype) -> None:
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = dims["dp"]
    if dims.ep_enabled:
        # Expert gradients already sum over the ep group's tokens: reduce over dp_mod_ep only
        # (FSDP divides by its size); apply_ep scaled them by 1 / ep, so the total divisor is
        # dp like every other gradient. (set_gradient_divide_factor would need PREMUL_SUM,
        # which gloo lacks.)
        for experts in expert_modules(model):
            fully_shard(experts, mesh=dims["dp_mod_ep"], mp_policy=policy)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are gathered again by the root at backward start anyway.
        reshard = index < len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(
        model, process_group=dp_mesh.get_group(), device_ids=device_ids, bucket_cap_mb=100
    )


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro batch of a step."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
