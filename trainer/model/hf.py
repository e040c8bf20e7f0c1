"""Explicit adapters between our models and Hugging Face checkpoints: tensor names and configs.

Our Llama applies RoPE with the rotate-half convention of Hugging Face `LlamaForCausalLM`, so
`wq`/`wk` ARE `q_proj`/`k_proj`: every tensor maps one-to-one by name with no permutation or
reshaping (tests/trainer/model/test_hf.py checks the logits). Meta's original
`consolidated.*.pth` weights use interleaved-pair RoPE and would need wq/wk permuted; importing
them is deliberately left out (convert them with transformers' script first).

Families are registered by our `model.name` in `FAMILIES`. A `mixtral` family slots in once
the MoE model exists: its own name rules (router and expert weights), `MixtralConfig`, and
config mappings, with the same `HFFamily` fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import LlamaConfig, PretrainedConfig

from trainer.model import hf_names
from trainer.model.config import ModelConfig


@dataclass(frozen=True)
class HFFamily:
    name: str
    """Our `model.name`."""
    model_type: str
    """HF config.json `model_type`."""
    architecture: str
    """HF config.json `architectures[0]`."""
    config_class: type[PretrainedConfig]
    to_hf_name: Callable[[str], str]
    from_hf_name: Callable[[str], str]
    overrides_from_hf: Callable[[PretrainedConfig, str], dict[str, Any]]
    hf_config_kwargs: Callable[[ModelConfig], dict[str, Any]]


def _llama_overrides(hf: PretrainedConfig, source: str) -> dict[str, Any]:
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{source}: rope_type {rope['rope_type']!r} (rope_scaling) is not supported; "
            "our Llama implements plain RoPE only"
        )
    for key in ("attention_bias", "mlp_bias"):
        if getattr(hf, key, False):
            raise ValueError(f"{source}: {key}=true is not supported (our Llama has no biases)")
    if hf.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act {hf.hidden_act!r} is not supported (only silu)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim and head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(
            f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported"
        )
    return {
        "name": "llama",
        "dim": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": hf.num_attention_heads,
        "n_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "vocab_size": hf.vocab_size,
        "ffn_dim": hf.intermediate_size,
        "norm_eps": float(hf.rms_norm_eps),
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "max_seq_len": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }


def _llama_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.ffn_hidden_dim(),
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


LLAMA = HFFamily(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    config_class=LlamaConfig,
    to_hf_name=hf_names.to_hf_name,
    from_hf_name=hf_names.from_hf_name,
    overrides_from_hf=_llama_overrides,
    hf_config_kwargs=_llama_hf_kwargs,
)
FAMILIES: dict[str, HFFamily] = {LLAMA.name: LLAMA}


def family_of_hf_config(config_json: dict[str, Any], source: str = "config.json") -> HFFamily:
    """The family of an HF config.json, by `model_type` (and `architectures` when present)."""
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    for family in FAMILIES.values():
        if model_type == family.model_type:
            if architectures and architectures[0] != family.architecture:
                raise ValueError(
                    f"{source}: architecture {architectures[0]!r} is not supported "
                    f"(supported: {family.architecture})"
                )
            return family
    supported = ", ".join(f.architecture for f in FAMILIES.values())
    found = architectures[0] if architectures else model_type
    raise ValueError(f"{source}: architecture {found!r} is not supported (supported: {supported})")


def family_of_model(name: str) -> HFFamily:
    if name not in FAMILIES:
        raise ValueError(f"model.name {name!r} has no Hugging Face export (have: {list(FAMILIES)})")
    return FAMILIES[name]


def hf_config_to_model_overrides(
    config_json: dict[str, Any], source: str = "config.json"
) -> dict[str, Any]:
    """Our `model.*` values (bare keys: dim, n_layers, ...) for an HF config.json's contents.

    transformers' own config class parses it first, so old and new spellings (e.g. top-level
    `rope_theta` vs `rope_parameters`) and defaults follow the library.
    """
    family = family_of_hf_config(config_json, source)
    try:
        hf = family.config_class.from_dict(config_json)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: not a valid {family.config_class.__name__}: {err}") from None
    return family.overrides_from_hf(hf, source)


def model_config_to_hf(
    model_cfg: dict[str, Any],
    torch_dtype: torch.dtype | str = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """A config.json (as a dict) for our `model:` section, built by transformers' config class."""
    cfg = model_config_from_dict(model_cfg)
    family = family_of_model(cfg.name)
    if cfg.moe.enabled():
        raise ValueError("model.moe: MoE models have no Hugging Face export yet (mixtral family)")
    hf = family.config_class(
        architectures=[family.architecture],
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        dtype=str(torch_dtype).removeprefix("torch."),
        **family.hf_config_kwargs(cfg),
    )
    return hf.to_dict()


def model_config_from_dict(model_cfg: dict[str, Any]) -> ModelConfig:
    """A validated ModelConfig from a `model:` section (omegaconf checks keys and types)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
        cfg: ModelConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"model config: {str(err).splitlines()[0]}") from None
    cfg.validate()
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (> 0) to describe the model")
    return cfg


def to_hf(state: dict[str, torch.Tensor], family: str = "llama") -> dict[str, torch.Tensor]:
    """Rename our parameter names (no `model.` checkpoint prefix) to HF names; same tensors."""
    rename = family_of_model(family).to_hf_name
    return {rename(name): tensor for name, tensor in state.items()}


def from_hf(
    state: dict[str, torch.Tensor], family: str = "llama", tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """Rename HF names to ours; a tied checkpoint without `lm_head.weight` gets the embedding
    as `output.weight`. Old checkpoints' `rotary_emb.inv_freq` buffers are dropped."""
    rename = family_of_model(family).from_hf_name
    ours = {rename(name): t for name, t in state.items() if not hf_names.is_ignored_hf(name)}
    if tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return ours
