"""A live DeepSpeed ZeRO engine's state as our checkpoint keys, through DeepSpeed's own mappings.

Each rank describes its fp32 master fragments and Adam moments as global boxes of the plain
model's parameters (`FlatRangeView`s over views of the ZeRO partitions), so the universal writer
saves them and the loader writes straight back into the partitions:

    ZeRO-1/2: `param._hp_mapping` (DeepSpeed's tensor_fragment): `lp_fragment_address`
              (start/numel in the flattened parameter) and the hp / optimizer-state views.
    ZeRO-3:   `grad_position[param id]` (sub-group, offset in its fp32 flat buffer) and the
              partition `ds_tensor.ds_numel`; the rank's partition starts at rank × ds_numel.

Keys match checkpointing/model_state.py: `model.<fqn>`, `optimizer.state.<fqn>.{exp_avg,
exp_avg_sq,step}` and JSON `optimizer.param_groups.<fqn>.<name>`, so a ZeRO run resumes under
FSDP2/DDP (any world size) and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from checkpointing.deepspeed.boxes import FlatRangeView
from checkpointing.model_state import MODEL_PREFIX, OPTIMIZER_PREFIX, _to_json

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Fragment:
    """This rank's piece of one parameter: flat elements [start, start + hp.numel())."""

    name: str
    shape: tuple[int, ...]
    start: int
    hp: torch.Tensor
    flat_hp: torch.Tensor
    """The optimizer's flat fp32 buffer holding `hp`; its state holds the moments."""
    offset: int
    """Where `hp` starts in `flat_hp`."""
    group: int


def deepspeed_tensors(engine) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`model.*` / `optimizer.state.*` views of this rank's partitions, param-group JSON).

    Lazy Adam state is created first (zeros, step 0, as AdamW would), so a fresh engine can be
    loaded into."""
    zero = engine.optimizer
    base = zero.optimizer
    fragments = _fragments(engine)
    _ensure_adam_state(zero, {id(f.flat_hp): f.flat_hp for f in fragments}.values())
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for frag in fragments:
        state = base.state[frag.flat_hp]
        tensors[f"{MODEL_PREFIX}{frag.name}"] = FlatRangeView(frag.hp, frag.start, frag.shape)
        for key in MOMENTS:
            view = state[key].narrow(0, frag.offset, frag.hp.numel())
            tensors[f"{OPTIMIZER_PREFIX}state.{frag.name}.{key}"] = FlatRangeView(
                view, frag.start, frag.shape
            )
        tensors[f"{OPTIMIZER_PREFIX}state.{frag.name}.step"] = state["step"].detach().clone()
        for key, value in base.param_groups[frag.group].items():
            if key != "params":
                name = f"{OPTIMIZER_PREFIX}param_groups.{frag.name}.{key}"
                values[name] = _to_json(name, value)
    return tensors, values


def apply_deepspeed_tensors(engine, tensors: dict[str, Any], values: dict[str, Any]) -> None:
    """Finish a load into the views from deepspeed_tensors: steps and hyperparameters into the
    optimizer, then the fp32 masters into the low-precision parameters DeepSpeed computes with."""
    zero = engine.optimizer
    base = zero.optimizer
    with_optimizer = any(k.startswith(OPTIMIZER_PREFIX) for k in tensors)
    for frag in _fragments(engine) if with_optimizer else ():
        step = tensors[f"{OPTIMIZER_PREFIX}state.{frag.name}.step"]
        state = base.state[frag.flat_hp]
        state["step"] = step.detach().clone().to(state["step"].dtype)
        group = base.param_groups[frag.group]
        for key, current in group.items():
            name = f"{OPTIMIZER_PREFIX}param_groups.{frag.name}.{key}"
            if key != "params" and name in values:
                group[key] = tuple(values[name]) if isinstance(current, tuple) else values[name]
    _check_steps_agree(base, tensors)
    refresh_low_precision_params(engine)


def refresh_low_precision_params(engine) -> None:
    """Copy the fp32 master partitions into the parameters forward uses, as DeepSpeed's own
    checkpoint loading does."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        zero.checkpoint_event_prologue()
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        zero.checkpoint_event_epilogue()
    else:
        zero.update_lp_params()


def _fragments(engine) -> list[Fragment]:
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed checkpoints need ZeRO stage 1, 2 or 3, got {stage}")
    return _zero3_fragments(engine.optimizer) if stage == 3 else _zero12_fragments(engine.optimizer)


def _zero12_fragments(zero) -> list[Fragment]:
    fragments = []
    for group, params in enumerate(zero.bit16_groups):
        flat_hp = zero.single_partition_of_fp32_groups[group]
        for param in params:
            name, mapping = zero.param_names[param], param._hp_mapping
            if mapping is None:  # no element of this parameter lives in this rank's partition
                hp, start, offset = flat_hp.narrow(0, 0, 0), 0, 0
            else:
                lp, hp_address = mapping.lp_fragment_address, mapping.hp_fragment_address
                assert lp.numel == hp_address.numel, (name, lp, hp_address)
                hp, start, offset = mapping.hp_fragment, lp.start, hp_address.start
                assert hp.data_ptr() == flat_hp.data_ptr() + offset * flat_hp.element_size()
            fragments.append(Fragment(name, tuple(param.shape), start, hp, flat_hp, offset, group))
    return fragments


def _zero3_fragments(zero) -> list[Fragment]:
    fragments = []
    for sub_group, params in enumerate(zero.fp16_groups):
        flat_hp = zero.fp32_partitioned_groups_flat[sub_group]
        group = zero.sub_group_to_group_id[sub_group]
        for param in params:
            position, offset, partition_numel = zero.grad_position[zero.get_param_id(param)]
            assert position == sub_group and partition_numel == param.ds_tensor.ds_numel
            start = dist.get_rank(group=param.ds_process_group) * partition_numel
            numel = max(0, min(partition_numel, param.ds_numel - start))  # the rest is padding
            hp = flat_hp.narrow(0, offset, numel)
            name = zero.param_names[param]
            fragments.append(
                Fragment(name, tuple(param.ds_shape), min(start, param.ds_numel), hp, flat_hp,
                         offset, group)
            )
    return fragments


def _ensure_adam_state(zero, flat_buffers) -> None:
    state = zero.optimizer.state
    for flat in flat_buffers:
        if not state[flat]:
            state[flat] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
            }
    missing = [k for flat in flat_buffers for k in (*MOMENTS, "step") if k not in state[flat]]
    if missing:
        raise ValueError(f"DeepSpeed optimizer state lacks {sorted(set(missing))} (Adam only)")
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 links moment views
        # DeepSpeed links them once, after the first group's step, so later groups' fragments
        # stay empty (safe_get_full_optimizer_state then fails); link again, all groups.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _check_steps_agree(base, tensors: dict[str, Any]) -> None:
    steps = {float(v) for k, v in tensors.items() if k.endswith(".step")}
    if len(steps) > 1:
        raise ValueError(f"checkpoint holds different optimizer steps {sorted(steps)}; ZeRO keeps "
                         "one step per parameter group")
