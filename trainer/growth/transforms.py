"""The growth entry points, on a checkpoint (`upcycle`, `stack`) or in memory (`*_tensors`).

Both paths build the same rules (trainer/growth/upcycle.py, stack.py) and expand them with
trainer/growth/plan.py; only where tensors come from and go to differs. Tensor keys are the
checkpoint's flat keys: `model.<fqn>`, `optimizer.state.<fqn>.<name>`; the optimizer's JSON
entries are `optimizer.param_groups.<fqn>.<hp>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.growth.files import SourceCheckpoint, config_yaml_with_model, write_grown_checkpoint
from trainer.growth.plan import (
    ParamRule,
    Spec,
    apply_to_tensors,
    expand,
    map_param_groups,
    model_params,
    specs_of,
)
from trainer.growth.stack import StackOptions, stack_rules, stacked_config
from trainer.growth.upcycle import (
    UpcycleOptions,
    exactness_report,
    upcycle_rules,
    upcycled_config,
)
from trainer.model.config import ModelConfig

_CARRY = {"copy": True, "keep": True, "reset": False}


@dataclass
class Grown:
    """An in-memory growth result (tensors may alias the inputs)."""

    tensors: dict[str, torch.Tensor]
    optimizer_json: dict
    model_config: ModelConfig


def carry_moments(optimizer: str) -> bool:
    if optimizer not in _CARRY:
        raise ValueError(f"--optimizer must be copy, keep or reset, got {optimizer!r}")
    return _CARRY[optimizer]


def _plan(kind: str, cfg: ModelConfig, specs: dict[str, Spec], opts) -> tuple:
    params = model_params(specs)
    if kind == "upcycle":
        rules = upcycle_rules(cfg, params, opts)  # validates opts first
        report = exactness_report(cfg, opts)
        if report:
            print(report, flush=True)
        return rules, upcycled_config(cfg, opts)
    return stack_rules(cfg, params, opts), stacked_config(cfg, opts)


def grow_tensors(
    kind: str,
    tensors: dict[str, torch.Tensor],
    model_config: ModelConfig,
    opts: UpcycleOptions | StackOptions,
    optimizer: str = "copy",
    optimizer_json: dict | None = None,
) -> Grown:
    """Grow a consolidated state (full tensors) in memory: the mid-run path (`grow.at_step`)."""
    specs = specs_of(tensors)
    rules, grown_cfg = _plan(kind, model_config, specs, opts)
    targets = expand(rules, specs, carry_moments(optimizer))
    out = dict(apply_to_tensors(targets, tensors))
    return Grown(out, map_param_groups(rules, optimizer_json or {}), grown_cfg)


def upcycle_tensors(tensors, model_config, optimizer="copy", optimizer_json=None, **options):
    return grow_tensors(
        "upcycle", tensors, model_config, UpcycleOptions(**options), optimizer, optimizer_json
    )


def stack_tensors(tensors, model_config, optimizer="keep", optimizer_json=None, **options):
    return grow_tensors(
        "stack", tensors, model_config, StackOptions(**options), optimizer, optimizer_json
    )


def grow_checkpoint(
    kind: str, src: str | Path, out: str | Path, opts, optimizer: str = "copy"
) -> Path:
    """Write the grown universal checkpoint under the checkpoint root `out`; returns its dir."""
    source = SourceCheckpoint(src)
    rules, grown_cfg = _plan(kind, source.model_config, source.specs, opts)
    targets = expand(rules, source.specs, carry_moments(optimizer))
    state = _grown_global_state(kind, source, rules, grown_cfg, opts, optimizer)
    return write_grown_checkpoint(source, out, targets, state)


def _grown_global_state(
    kind: str, source: SourceCheckpoint, rules: list[ParamRule], grown_cfg, opts, optimizer: str
) -> dict:
    state = dict(source.global_state)
    state["config"] = config_yaml_with_model(source.job_config, grown_cfg)
    state["optimizer"] = map_param_groups(rules, state.get("optimizer", {}))
    state["phase"] = {
        "grown": {
            "kind": kind,
            "from": str(source.path),
            "source_step": source.index.step,
            "optimizer": optimizer,
            "options": asdict(opts),
        },
        "source_phase": state.get("phase", {}),
    }
    # A layout no run has: a resume from this checkpoint re-seeds RNG rather than restoring it.
    state["layout"] = {**state.get("layout", {}), "grown": kind}
    return state


def upcycle(
    src: str | Path,
    out: str | Path,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    router_init: str = "auto",
    optimizer: str = "copy",
    every_n_layers: int = 1,
    router: str = "softmax_topk_renorm",
    seed: int = 0,
) -> Path:
    opts = UpcycleOptions(
        num_experts, top_k, granularity, router_init, every_n_layers, router, seed
    )
    return grow_checkpoint("upcycle", src, out, opts, optimizer)


def stack(
    src: str | Path,
    out: str | Path,
    method: str = "gstack",
    factor: int = 2,
    every: int = 1,
    layers: str = "",
    freeze_old: bool = False,
    optimizer: str = "keep",
) -> Path:
    opts = StackOptions(method, factor, every, layers, freeze_old)
    return grow_checkpoint("stack", src, out, opts, optimizer)
