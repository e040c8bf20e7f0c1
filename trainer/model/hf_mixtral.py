"""Our MoE Llama as Hugging Face `MixtralForCausalLM`: tensor names, expert layout, config.

Export writes the per-expert layout that transformers 5.x itself writes with `save_pretrained`
(and that 4.x loads natively): `model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight` ...
transformers 5.x fuses these on load into `mlp.experts.gate_up_proj [E, 2·hidden, dim]` (w1 rows
then w3 rows) and `mlp.experts.down_proj [E, dim, hidden]`; import accepts both layouts.

Only what Mixtral can express exports: every layer MoE (`model.moe.every_n_layers=1`), softmax
then top-k renormalised to sum 1 (`model.moe.router=softmax_topk_renorm`), plain router logits
(`model.moe.norm_gate_logits=false`). Capacity-limited routing (`capacity_factor > 0`) is a
training-time token drop; HF Mixtral always routes dropless, so exporting it is allowed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PretrainedConfig

from trainer.model import hf_names
from trainer.model.config import ModelConfig
from trainer.model.hf_common import decoder_hf_kwargs, decoder_overrides

EXPERT_WEIGHTS = ("w1", "w2", "w3")
_OUR_EXPERTS = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3)$")
_OUR_GATE = re.compile(r"^layers\.(\d+)\.feed_forward\.gate\.weight$")
_HF_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$"
)
_HF_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_GATE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")


def check_mixtral_expressible(cfg: ModelConfig) -> None:
    """ValueError naming the first `model.moe.*` setting HF Mixtral cannot express."""
    moe = cfg.moe
    if moe.every_n_layers != 1:
        raise ValueError(
            f"model.moe.every_n_layers={moe.every_n_layers}: Mixtral needs every layer MoE "
            "(every_n_layers=1); this model cannot be exported as MixtralForCausalLM"
        )
    if moe.router != "softmax_topk_renorm":
        raise ValueError(
            f"model.moe.router={moe.router!r}: Mixtral renormalises the top-k weights "
            "(softmax_topk_renorm); this model cannot be exported as MixtralForCausalLM"
        )
    if moe.norm_gate_logits:
        raise ValueError(
            "model.moe.norm_gate_logits=true: Mixtral's router has no logit normalisation; "
            "this model cannot be exported as MixtralForCausalLM"
        )


def to_hf_names(name: str, num_experts: int) -> list[tuple[str, int | None]]:
    """(HF name, expert row or None) for one of our parameters: a stacked expert tensor
    becomes one HF tensor per expert (row j of ours), everything else maps one-to-one."""
    match = _OUR_EXPERTS.match(name)
    if match:
        layer, weight = match.groups()
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        return [(f"{prefix}.{j}.{weight}.weight", j) for j in range(num_experts)]
    match = _OUR_GATE.match(name)
    if match:
        return [(f"model.layers.{match.group(1)}.block_sparse_moe.gate.weight", None)]
    return [(hf_names.to_hf_name(name), None)]


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for a Mixtral state dict in either layout; per-expert tensors are stacked."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for hf_name, tensor in state.items():
        if hf_names.is_ignored_hf(hf_name):
            continue
        if match := _HF_EXPERT.match(hf_name):
            layer, j, weight = match.groups()
            experts.setdefault((layer, weight), {})[int(j)] = tensor
        elif match := _HF_FUSED.match(hf_name):
            ours.update(_unfuse(match.group(1), match.group(2), tensor))
        elif match := _HF_GATE.match(hf_name):
            ours[f"layers.{match.group(1)}.feed_forward.gate.weight"] = tensor
        else:
            ours[hf_names.from_hf_name(hf_name)] = tensor
    for (layer, weight), rows in experts.items():
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(
                f"layer {layer} {weight}: expert indices {sorted(rows)} are not 0..{len(rows) - 1}"
            )
        stacked = torch.stack([rows[j] for j in range(len(rows))])
        ours[f"layers.{layer}.feed_forward.experts.{weight}"] = stacked
    return ours


def _unfuse(layer: str, kind: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"layers.{layer}.feed_forward.experts."
    if kind == "down_proj":
        return {prefix + "w2": tensor}
    gate, up = tensor.chunk(2, dim=1)
    return {prefix + "w1": gate, prefix + "w3": up}


def mixtral_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    check_mixtral_expressible(cfg)
    return {
        **decoder_hf_kwargs(cfg, intermediate_size=cfg.expert_hidden_dim()),
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }


def mixtral_overrides(hf: PretrainedConfig, source: str) -> dict[str, Any]:
    """Our `model.*` values for a MixtralConfig; ValueError naming what we cannot run."""
    if getattr(hf, "sliding_window", None):
        raise ValueError(f"{source}: sliding_window={hf.sliding_window} is not supported")
    return {
        **decoder_overrides(hf, source, default_rope_theta=1e6),
        "moe": {
            "num_experts": hf.num_local_experts,
            "top_k": hf.num_experts_per_tok,
            "aux_loss_coef": float(hf.router_aux_loss_coef),
        },
    }
