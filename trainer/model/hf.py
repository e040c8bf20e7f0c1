"""Explicit adapters between our models and Hugging Face checkpoints: tensor names and configs.

Our Llama applies RoPE with the rotate-half convention of Hugging Face `LlamaForCausalLM`, so
`wq`/`wk` ARE `q_proj`/`k_proj`: every tensor maps one-to-one by name with no permutation or
reshaping (tests/trainer/model/test_hf.py checks the logits). Meta's original
`consolidated.*.pth` weights use interleaved-pair RoPE and would need wq/wk permuted; importing
them is deliberately left out (convert them with transformers' script first).

A dense `llama` model is `LlamaForCausalLM`; one with `model.moe.num_experts > 0` is
`MixtralForCausalLM` (trainer/model/hf_mixtral.py: one HF tensor per expert, router renamed).
`family_of_config` picks the family of a model config, `family_of_hf_config` that of a
config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import LlamaConfig, MixtralConfig, PretrainedConfig

from trainer.model import hf_mixtral, hf_names
from trainer.model.config import ModelConfig
from trainer.model.hf_common import decoder_hf_kwargs, decoder_overrides


@dataclass(frozen=True)
class HFFamily:
    name: str
    """Our `model.name`."""
    model_type: str
    """HF config.json `model_type`."""
    architecture: str
    """HF config.json `architectures[0]`."""
    config_class: type[PretrainedConfig]
    to_hf_names: Callable[[str, int], list[tuple[str, int | None]]]
    """(HF name, row or None) for one of our parameters and its leading dimension: most map
    one-to-one (None); a stacked expert tensor maps to one HF tensor per row."""
    state_from_hf: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    overrides_from_hf: Callable[[PretrainedConfig, str], dict[str, Any]]
    hf_config_kwargs: Callable[[ModelConfig], dict[str, Any]]


def _llama_overrides(hf: PretrainedConfig, source: str) -> dict[str, Any]:
    for key in ("attention_bias", "mlp_bias"):
        if getattr(hf, key, False):
            raise ValueError(f"{source}: {key}=true is not supported (our Llama has no biases)")
    return decoder_overrides(hf, source, default_rope_theta=10000.0)


def _llama_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **decoder_hf_kwargs(cfg, intermediate_size=cfg.ffn_hidden_dim()),
        "attention_bias": False,
        "mlp_bias": False,
    }


def _llama_to_hf_names(name: str, rows: int) -> list[tuple[str, int | None]]:
    return [(hf_names.to_hf_name(name), None)]


def _llama_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept = (name for name in state if not hf_names.is_ignored_hf(name))
    return {hf_names.from_hf_name(name): state[name] for name in kept}


LLAMA = HFFamily(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    config_class=LlamaConfig,
    to_hf_names=_llama_to_hf_names,
    state_from_hf=_llama_state_from_hf,
    overrides_from_hf=_llama_overrides,
    hf_config_kwargs=_llama_hf_kwargs,
)
MIXTRAL = HFFamily(
    name="llama",
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    config_class=MixtralConfig,
    to_hf_names=hf_mixtral.to_hf_names,
    state_from_hf=hf_mixtral.state_from_hf,
    overrides_from_hf=hf_mixtral.mixtral_overrides,
    hf_config_kwargs=hf_mixtral.mixtral_hf_kwargs,
)
FAMILIES: dict[str, HFFamily] = {LLAMA.name: LLAMA}
"""Dense families by our `model.name`; `family_of_config` adds MoE."""
HF_FAMILIES = (LLAMA, MIXTRAL)


def family_of_hf_config(config_json: dict[str, Any], source: str = "config.json") -> HFFamily:
    """The family of an HF config.json, by `model_type` (and `architectures` when present)."""
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    for family in HF_FAMILIES:
        if model_type == family.model_type:
            if architectures and architectures[0] != family.architecture:
                raise ValueError(
                    f"{source}: architecture {architectures[0]!r} is not supported "
                    f"(supported: {family.architecture})"
                )
            return family
    supported = ", ".join(f.architecture for f in HF_FAMILIES)
    found = architectures[0] if architectures else model_type
    raise ValueError(f"{source}: architecture {found!r} is not supported (supported: {supported})")


def family_of_model(name: str) -> HFFamily:
    if name not in FAMILIES:
        raise ValueError(f"model.name {name!r} has no Hugging Face export (have: {list(FAMILIES)})")
    return FAMILIES[name]


def family_of_config(cfg: ModelConfig) -> HFFamily:
    """Mixtral for an MoE model, else the dense family of `model.name`."""
    family = family_of_model(cfg.name)
    return MIXTRAL if cfg.moe.enabled() and family is LLAMA else family


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
    family = family_of_config(cfg)
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


def _family(family: str | HFFamily) -> HFFamily:
    if isinstance(family, HFFamily):
        return family
    return MIXTRAL if family == "mixtral" else family_of_model(family)


def to_hf(
    state: dict[str, torch.Tensor], family: str | HFFamily = "llama"
) -> dict[str, torch.Tensor]:
    """Our parameters (no `model.` checkpoint prefix) under HF names; the same tensors, or
    views of their rows for stacked experts (family "mixtral")."""
    to_hf_names = _family(family).to_hf_names
    out = {}
    for name, tensor in state.items():
        for hf_name, row in to_hf_names(name, tensor.shape[0] if tensor.dim() else 0):
            out[hf_name] = tensor if row is None else tensor[row]
    return out


def from_hf(
    state: dict[str, torch.Tensor], family: str | HFFamily = "llama", tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """HF tensors under our names (Mixtral experts stacked); a tied checkpoint without
    `lm_head.weight` gets the embedding as `output.weight`. Old checkpoints'
    `rotary_emb.inv_freq` buffers are dropped."""
    ours = _family(family).state_from_hf(state)
    if tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return ours
