"""The pure core of every growth transform: per-parameter rules expanded into target tensors.

A transform (upcycle, stack) only says, for each parameter of the grown model, which source
parameter it comes from and how its value is made (`ParamRule`). `expand` turns the rules into
`Target`s over flat checkpoint keys (`model.<fqn>`, `optimizer.state.<fqn>.<name>`), each built
from at most one source tensor, so the same plan runs on a checkpoint one tensor at a time
(trainer/growth/files.py) or on an in-memory dict of full tensors (`apply_to_tensors`).

Optimizer state: a parameter whose value is carried over (copied, split or repeated from the
source) keeps its moments transformed the same way, or gets fresh ones (`carry_moments=False`);
a parameter with a new value (router, zeroed projection) always starts fresh. Fresh state is
written explicitly as AdamW's initial state (zero moments, step 0), so a grown checkpoint loads
with the ordinary, strict optimizer-state path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

MODEL = "model."
STATE = "optimizer.state."
GROUPS = "optimizer.param_groups."

TensorFn = Callable[[torch.Tensor], torch.Tensor]
Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class ParamRule:
    """Parameter `target` of the grown model, made from source parameter `source`.

    weight(source weight) gives the value; moment(source moment) transforms carried-over moments
    (None: the value is new, so its optimizer state starts fresh). With new_value=True `weight`
    only looks at its argument's shape and dtype, so the source is never read.
    """

    target: str
    source: str
    weight: TensorFn
    moment: TensorFn | None = None
    new_value: bool = False


@dataclass(frozen=True)
class Target:
    """One tensor of the grown checkpoint: build(*values of `sources`)."""

    name: str
    sources: tuple[str, ...]
    build: Callable[..., torch.Tensor]


def same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def carried(target: str, source: str, fn: TensorFn = same) -> ParamRule:
    return ParamRule(target, source, weight=fn, moment=fn)


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, Spec]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def model_params(specs: dict[str, Spec]) -> list[str]:
    return [name.removeprefix(MODEL) for name in specs if name.startswith(MODEL)]


def expand(rules: list[ParamRule], specs: dict[str, Spec], carry_moments: bool) -> list[Target]:
    states = _state_names(specs)
    targets: list[Target] = []
    for rule in rules:
        source_key = MODEL + rule.source
        if source_key not in specs:
            raise ValueError(f"growth needs tensor {source_key!r}, which the source lacks")
        shape, dtype = specs[source_key]
        if rule.new_value:
            like = _shape_only(shape, dtype)
            targets.append(Target(MODEL + rule.target, (), lambda f=rule.weight, x=like: f(x)))
        else:
            targets.append(Target(MODEL + rule.target, (source_key,), rule.weight))
        target_shape = tuple(rule.weight(_shape_only(shape, dtype, meta=True)).shape)
        keep = carry_moments and rule.moment is not None
        for name in states.get(rule.source, ()):
            targets.append(_state_target(rule, name, specs, shape, target_shape, keep))
    return targets


def _state_target(
    rule: ParamRule, name: str, specs: dict[str, Spec], shape, target_shape, keep: bool
) -> Target:
    key = f"{STATE}{rule.source}.{name}"
    state_shape, dtype = specs[key]
    target = f"{STATE}{rule.target}.{name}"
    if state_shape == ():  # a per-parameter counter such as AdamW's `step`
        if keep:
            return Target(target, (key,), same)
        return Target(target, (), lambda d=dtype: torch.zeros((), dtype=d))
    if state_shape != shape:
        raise ValueError(
            f"optimizer state {key!r} has shape {state_shape}, not its parameter's {shape}; "
            "growth only handles element-wise optimizer state"
        )
    if keep:
        return Target(target, (key,), rule.moment)
    return Target(target, (), lambda s=target_shape, d=dtype: torch.zeros(s, dtype=d))


def _state_names(specs: dict[str, Spec]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = defaultdict(list)
    for key in specs:
        if key.startswith(STATE):
            fqn, name = key.removeprefix(STATE).rsplit(".", 1)
            names[fqn].append(name)
    return names


def _shape_only(shape, dtype: torch.dtype, meta: bool = False) -> torch.Tensor:
    """A tensor with the right shape and dtype and no storage to speak of."""
    if meta:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty((), dtype=dtype).expand(shape)


def target_specs(targets: list[Target], specs: dict[str, Spec]) -> dict[str, Spec]:
    """Shapes and dtypes of the targets, computed on the meta device (no data touched)."""
    out = {}
    for target in targets:
        inputs = [_shape_only(*specs[s], meta=True) for s in target.sources]
        value = target.build(*inputs)
        out[target.name] = (tuple(value.shape), value.dtype)
    return out


def map_param_groups(rules: list[ParamRule], optimizer_json: dict) -> dict:
    """`optimizer.param_groups.<fqn>.<hp>` JSON entries for the grown model's parameters: each
    target takes its source's hyperparameters. Other entries are kept as they are."""
    by_param: dict[str, dict] = defaultdict(dict)
    out = {}
    for key, value in optimizer_json.items():
        if key.startswith(GROUPS):
            fqn, hp = key.removeprefix(GROUPS).rsplit(".", 1)
            by_param[fqn][hp] = value
        else:
            out[key] = value
    if not by_param:
        return out
    for rule in rules:
        for hp, value in by_param[rule.source].items():
            out[f"{GROUPS}{rule.target}.{hp}"] = value
    return out


def apply_to_tensors(targets: list[Target], tensors: dict[str, torch.Tensor]) -> Iterator:
    """(name, value) of every target computed from in-memory full tensors (may alias them)."""
    for target in targets:
        yield target.name, target.build(*(tensors[s] for s in target.sources))
