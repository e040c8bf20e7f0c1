"""Depth growth: the grown model's layer k is a copy of one source layer.

- gstack (Du et al. 2024, "Stacking Your Transformers"): the L-layer stack repeated `factor`
  times; target layer k = source layer k mod L. Not function-preserving.
- interleave-identity (LLaMA Pro block expansion): after every `every`-th block insert a copy of
  it whose attention output projection (`attention.wo`) and feed-forward down projection
  (`feed_forward.w2`, or `feed_forward.experts.w2`) are zero, so the inserted block is the
  identity and the grown model computes exactly the source function. `freeze_old` records the
  original blocks in `model.frozen_layers` so only the inserted ones train.
- dus (SOLAR depth up-scaling): the concatenation of explicit source layer ranges, e.g.
  "0:24,8:32" (Python slices: start inclusive, end exclusive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from trainer.growth.plan import ParamRule, carried
from trainer.model.config import ModelConfig

METHODS = ("gstack", "interleave-identity", "dus")
_LAYER_PARAM = re.compile(r"^layers\.(\d+)\.(.+)$")
_ZEROED_IN_IDENTITY = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2")


@dataclass(frozen=True)
class StackOptions:
    method: str
    factor: int = 2
    """gstack: how many times the stack is repeated."""
    every: int = 1
    """interleave-identity: insert an identity copy after every n-th source block."""
    layers: str = ""
    """dus: source layer ranges, e.g. "0:24,8:32"."""
    freeze_old: bool = False
    """interleave-identity: freeze the original blocks (recorded in model.frozen_layers)."""


@dataclass(frozen=True)
class LayerCopy:
    source: int
    identity: bool = False


def layer_map(num_layers: int, opts: StackOptions) -> list[LayerCopy]:
    """The grown model's layers, in order, as copies of source layers."""
    if opts.method == "gstack":
        if opts.factor < 1:
            raise ValueError(f"--factor must be >= 1, got {opts.factor}")
        return [LayerCopy(k % num_layers) for k in range(num_layers * opts.factor)]
    if opts.method == "interleave-identity":
        if opts.every < 1:
            raise ValueError(f"--every must be >= 1, got {opts.every}")
        out = []
        for i in range(num_layers):
            out.append(LayerCopy(i))
            if (i + 1) % opts.every == 0:
                out.append(LayerCopy(i, identity=True))
        return out
    if opts.method == "dus":
        return [LayerCopy(i) for i in parse_layer_ranges(opts.layers, num_layers)]
    raise ValueError(f"--method must be one of {METHODS}, got {opts.method!r}")


def parse_layer_ranges(spec: str, num_layers: int) -> list[int]:
    """ "0:24,8:32" -> [0..23, 8..31]; ValueError naming --layers on any malformed range."""
    if not spec.strip():
        raise ValueError("--layers is required for --method dus (e.g. --layers 0:24,8:32)")
    layers: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not match:
            raise ValueError(f"--layers: range {part!r} is not of the form START:END")
        start, end = int(match.group(1)), int(match.group(2))
        if not start < end <= num_layers:
            raise ValueError(
                f"--layers: range {part.strip()!r} must satisfy START < END <= {num_layers} "
                "(the source's model.n_layers)"
            )
        layers.extend(range(start, end))
    return layers


def check_stack(cfg: ModelConfig, opts: StackOptions) -> list[LayerCopy]:
    copies = layer_map(cfg.n_layers, opts)
    if cfg.moe.enabled() and cfg.moe.every_n_layers != 1:
        raise ValueError(
            f"stacking an interleaved MoE model (model.moe.every_n_layers="
            f"{cfg.moe.every_n_layers}) would change which layers are MoE; not supported"
        )
    if opts.freeze_old and opts.method != "interleave-identity":
        raise ValueError("--freeze-old applies to --method interleave-identity only")
    return copies


def stacked_config(cfg: ModelConfig, opts: StackOptions) -> ModelConfig:
    copies = check_stack(cfg, opts)
    frozen = [k for k, c in enumerate(copies) if not c.identity] if opts.freeze_old else []
    grown = replace(cfg, n_layers=len(copies), frozen_layers=frozen)
    grown.validate()
    return grown


def stack_rules(cfg: ModelConfig, params: list[str], opts: StackOptions) -> list[ParamRule]:
    copies = check_stack(cfg, opts)
    by_layer: dict[int, list[str]] = {}
    rules = []
    for name in params:
        match = _LAYER_PARAM.match(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(match.group(2))
        else:
            rules.append(carried(name, name))
    for k, copy in enumerate(copies):
        for rest in by_layer.get(copy.source, []):
            source, target = f"layers.{copy.source}.{rest}", f"layers.{k}.{rest}"
            if copy.identity and rest in _ZEROED_IN_IDENTITY:
                rules.append(ParamRule(target, source, _zeros, new_value=True))
            else:
                rules.append(carried(target, source))
    return rules


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
