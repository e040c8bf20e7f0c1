"""Dense → MoE upcycling (Sparse Upcycling; He et al. 2024, "Upcycling LLMs into MoE").

Every expert of an MoE layer is a copy of that layer's dense SwiGLU MLP and the router is new;
all other weights are copied. With granularity G the dense hidden dim is split into G shards and
the layer gets E·G fine-grained experts, expert e·G + g being shard g of copy e (Megatron-Core
`upcycling_utils` order). The "virtual-group" router init gives the G experts of one copy the
same router row, so with top_k a multiple of G the top-k picks whole copies; w2 is then scaled
so the layer's output equals the dense one: by G under renormalised top-k (exact), by E·G·G/k
under softmax-then-top-k (exact only at a uniform router). Megatron spreads that scale as
s^(1/3) over fc1 and fc2, which is exact only for homogeneous activations; SwiGLU is linear in
w2 alone, so we put all of it there. G = 1 needs no scaling under renormalised top-k: with
identical experts and dropless routing the upcycled model computes exactly the dense function.

Under softmax-then-top-k (`--router softmax_topk`, Switch / T5X style) a layer whose top-k picks
whole copies computes factor(x) · dense_mlp(x), factor(x) = scale · Σ_chosen p_i / G: 1 only
where the router is uniform, so no scale makes it exact for a router that can learn. Upcycling
then prints one line with how far the factor strays on probe tokens (`exactness_report`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from trainer.growth.plan import ParamRule, carried
from trainer.model.config import ModelConfig, MoEConfig

_DENSE_FFN = re.compile(r"^layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$")
ROUTER_INITS = ("normal", "virtual-group")


@dataclass(frozen=True)
class UpcycleOptions:
    num_experts: int
    """Copies of each dense MLP (E); with granularity G the layer has E·G experts."""
    top_k: int
    """Experts per token among the E·G."""
    granularity: int = 1
    router_init: str = "auto"
    """normal, virtual-group, or auto (virtual-group when granularity > 1)."""
    every_n_layers: int = 1
    router: str = "softmax_topk_renorm"
    seed: int = 0
    """Seeds the router init (layer i uses seed + i), so file and in-memory runs agree."""

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.granularity

    def resolved_router_init(self) -> str:
        if self.router_init == "auto":
            return "virtual-group" if self.granularity > 1 else "normal"
        return self.router_init


def check_upcycle(cfg: ModelConfig, opts: UpcycleOptions) -> None:
    if cfg.moe.enabled():
        raise ValueError(
            f"the source is already an MoE model (model.moe.num_experts={cfg.moe.num_experts}); "
            "upcycle needs a dense model"
        )
    if opts.num_experts < 1 or opts.granularity < 1 or opts.every_n_layers < 1:
        raise ValueError("--num-experts, --granularity and --every must be >= 1")
    if not 1 <= opts.top_k <= opts.total_experts:
        raise ValueError(f"--top-k must be in [1, {opts.total_experts}], got {opts.top_k}")
    hidden = cfg.ffn_hidden_dim()
    if hidden % opts.granularity:
        raise ValueError(
            f"--granularity {opts.granularity} does not divide the dense hidden dim {hidden}"
        )
    init = opts.resolved_router_init()
    if init not in ROUTER_INITS:
        raise ValueError(f"--router-init must be one of {ROUTER_INITS} or auto, got {init!r}")
    if init == "virtual-group" and opts.top_k % opts.granularity:
        raise ValueError(
            f"--router-init virtual-group needs --top-k ({opts.top_k}) to be a multiple of "
            f"--granularity ({opts.granularity})"
        )
    MoEConfig(**_moe_fields(cfg, opts)).validate()


def upcycled_config(cfg: ModelConfig, opts: UpcycleOptions) -> ModelConfig:
    grown = replace(cfg, moe=MoEConfig(**_moe_fields(cfg, opts)))
    grown.validate()
    return grown


def _moe_fields(cfg: ModelConfig, opts: UpcycleOptions) -> dict:
    hidden = cfg.ffn_hidden_dim() // opts.granularity if opts.granularity > 1 else 0
    return {
        "num_experts": opts.total_experts,
        "top_k": opts.top_k,
        "every_n_layers": opts.every_n_layers,
        "router": opts.router,
        "hidden_dim": hidden,
    }


def upcycle_rules(cfg: ModelConfig, params: list[str], opts: UpcycleOptions) -> list[ParamRule]:
    check_upcycle(cfg, opts)
    grown = upcycled_config(cfg, opts)
    rules = []
    for name in params:
        match = _DENSE_FFN.match(name)
        if not match or not grown.moe.is_moe_layer(int(match.group(1))):
            rules.append(carried(name, name))
            continue
        layer, weight = int(match.group(1)), match.group(2)
        prefix = f"layers.{layer}.feed_forward."
        scale = _w2_scale(opts) if weight == "w2" else 1.0
        rules.append(
            ParamRule(
                prefix + f"experts.{weight}",
                name,
                weight=_expert_fn(weight, opts, scale),
                moment=_expert_fn(weight, opts),  # moments are split and repeated, not scaled
            )
        )
        if weight == "w1":
            router = _router_fn(opts, cfg.init_std, opts.seed + layer)
            rules.append(ParamRule(prefix + "gate.weight", name, router, new_value=True))
    return rules


def _w2_scale(opts: UpcycleOptions) -> float:
    g = opts.granularity
    if opts.router == "softmax_topk_renorm":
        return float(g)
    return opts.num_experts * g * g / opts.top_k  # exact at a uniform router, G = 1 included


PROBE_TOKENS = 1024


def exactness_report(cfg: ModelConfig, opts: UpcycleOptions) -> str | None:
    """One line when the upcycled model is not function-preserving, with by how much: the
    per-token factor on the MLP output, over every MoE layer's new router and PROBE_TOKENS
    random unit-RMS inputs (what the layer's RMSNorm hands the MLP before its weight)."""
    if opts.router == "softmax_topk_renorm":
        return None
    prefix = "upcycle: --router softmax_topk is not function-preserving"
    if opts.granularity > 1 and opts.resolved_router_init() != "virtual-group":
        return f"{prefix} (fine-grained experts with --router-init normal)"
    grown = upcycled_config(cfg, opts)
    probe = torch.randn(PROBE_TOKENS, cfg.dim, generator=torch.Generator().manual_seed(opts.seed))
    probe = probe / probe.square().mean(-1, keepdim=True).sqrt()
    factors = []
    for layer in filter(grown.moe.is_moe_layer, range(cfg.n_layers)):
        rows = _router_fn(opts, cfg.init_std, opts.seed + layer)(torch.empty(0, cfg.dim))
        chosen = (probe @ rows.T).softmax(-1).topk(opts.top_k, dim=-1).values.sum(-1)
        factors.append(chosen * _w2_scale(opts) / opts.granularity)
    factor = torch.cat(factors)
    deviation = (factor - 1).abs().max().item()
    return (
        f"{prefix}: each MoE layer computes the dense MLP times a per-token factor in "
        f"[{factor.min().item():.4f}, {factor.max().item():.4f}] (max deviation "
        f"{deviation:.2%} on {PROBE_TOKENS} probe tokens); --router softmax_topk_renorm is exact"
    )


def _expert_fn(weight: str, opts: UpcycleOptions, scale: float = 1.0):
    copies, g = opts.num_experts, opts.granularity

    def build(dense: torch.Tensor) -> torch.Tensor:
        if weight == "w2":  # [dim, hidden] -> G shards of the hidden columns
            dim, hidden = dense.shape
            shards = dense.reshape(dim, g, hidden // g).permute(1, 0, 2)
        else:  # [hidden, dim] -> G shards of the hidden rows
            hidden, dim = dense.shape
            shards = dense.reshape(g, hidden // g, dim)
        experts = shards.repeat(copies, 1, 1)
        return experts * scale if scale != 1.0 else experts

    return build


def _router_fn(opts: UpcycleOptions, std: float, seed: int):
    copies, g = opts.num_experts, opts.granularity
    groups = copies if opts.resolved_router_init() == "virtual-group" else copies * g

    def build(dense_w1: torch.Tensor) -> torch.Tensor:
        dim = dense_w1.shape[1]
        if dense_w1.is_meta:
            return torch.empty(copies * g, dim, dtype=dense_w1.dtype, device="meta")
        generator = torch.Generator().manual_seed(seed)
        rows = torch.empty(groups, dim).normal_(0.0, std, generator=generator)
        return rows.repeat_interleave(copies * g // groups, dim=0).to(dense_w1.dtype)

    return build
