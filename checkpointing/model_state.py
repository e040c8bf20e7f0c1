"""Flatten a model + optimizer into the flat `tensors` dict CheckpointManager saves, and back.

Keys are the plain model's parameter names (DDP `module.`, activation-checkpoint and
torch.compile prefixes are stripped by torch.distributed.checkpoint.state_dict):

    model.<fqn>                               parameters and buffers
    optimizer.state.<fqn>.<name>              e.g. exp_avg, exp_avg_sq, step
    optimizer.param_groups.<fqn>.<name>       hyperparameters: JSON, never tensors (no pickle)
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.<fqn>` -> parameter/buffer (DTensor under FSDP2/TP), sharing storage with it."""
    return {MODEL_PREFIX + k: v for k, v in get_model_state_dict(model).items()}


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(`optimizer.*` tensors, JSON-able non-tensor entries such as lr/betas/weight_decay).

    Lazy optimizer state is initialised, so a fresh optimizer can be loaded into.
    """
    fresh = not optimizer.state
    flat = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    if fresh and optimizer.state:
        # torch initialises lazy state by taking one zero-gradient, lr=0 step: moments stay 0
        # but `step` becomes 1, which would shift Adam's bias correction by a step.
        for param_state in optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"].zero_()
        flat = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    tensors, values = {}, {}
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            tensors[OPTIMIZER_PREFIX + key] = value
        else:
            values[OPTIMIZER_PREFIX + key] = _to_json(key, value)
    return tensors, values


class OptimizerValues:
    """The JSON entries of `optimizer_tensors`, re-read from the live param groups.

    For a caller that keeps the tensors of one `optimizer_tensors` call (they are the live
    state, updated in place): building the flat state dict again costs milliseconds per call,
    reading the param groups microseconds. Keys follow DCP's flattening,
    `param_groups.<fqn>.<hyperparameter>`; the first result is checked against DCP's own.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        nested = get_optimizer_state_dict(model, optimizer)  # its groups list FQNs
        self.groups = optimizer.param_groups
        self.sources = [
            (f"{OPTIMIZER_PREFIX}param_groups.{fqn}.{name}", index, name)
            for index, group in enumerate(nested["param_groups"])
            for fqn in group["params"]
            for name in group
            if name != "params"
        ]
        expected = optimizer_tensors(model, optimizer)[1]
        assert self() == expected, "optimizer JSON entries differ from DCP's flattening"

    def __call__(self) -> dict[str, Any]:
        return {key: _plain(self.groups[i][name]) for key, i, name in self.sources}


def apply_model_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy the `model.*` entries of `tensors` into `model` (any parallel layout)."""
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in tensors.items() if _is_model(k)}
    set_model_state_dict(model, state, options=StateDictOptions(strict=strict))


def apply_optimizer_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    values: dict[str, Any],
) -> None:
    """Restore the optimizer from `optimizer.*` tensors plus the JSON entries from
    optimizer_tensors (lists become tuples where the optimizer holds a tuple, e.g. betas).
    `values` may also hold entries of parameters this rank does not have: they are skipped."""
    current = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIMIZER_PREFIX):
            state[key.removeprefix(OPTIMIZER_PREFIX)] = value
    for key, value in values.items():
        name = key.removeprefix(OPTIMIZER_PREFIX)
        if name not in current:  # another rank's parameter (e.g. another pipeline stage)
            continue
        state[name] = tuple(value) if isinstance(current.get(name), tuple) else value
    missing = sorted(set(current) - set(state))
    if missing:
        raise ValueError(f"optimizer state is missing {missing[:5]}")
    set_optimizer_state_dict(model, optimizer, state, options=_FLAT)


def _is_model(key: str) -> bool:
    return key.startswith(MODEL_PREFIX)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _to_json(key: str, value: Any) -> Any:
    value = _plain(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer entry {key!r} is not JSON-serialisable: {err}") from err
    return value
