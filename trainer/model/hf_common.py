"""What every supported Hugging Face decoder config shares: the checks for features our Llama
does not have, and the `model.*` values of its attention/embedding trunk."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


def decoder_overrides(hf: PretrainedConfig, source: str, default_rope_theta: float) -> dict:
    """Our `model.*` values for `hf`'s dense trunk; ValueError naming what we cannot run."""
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{source}: rope_type {rope['rope_type']!r} (rope_scaling) is not supported; "
            "our Llama implements plain RoPE only"
        )
    if hf.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act {hf.hidden_act!r} is not supported (only silu)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim and head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(
            f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported"
        )
    overrides: dict[str, Any] = {
        "name": "llama",
        "dim": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": hf.num_attention_heads,
        "n_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "vocab_size": hf.vocab_size,
        "ffn_dim": hf.intermediate_size,
        "norm_eps": float(hf.rms_norm_eps),
        "rope_theta": float(rope.get("rope_theta", default_rope_theta)),
        "max_seq_len": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
    return overrides


def decoder_hf_kwargs(cfg, intermediate_size: int) -> dict[str, Any]:
    """The config-class arguments of our dense trunk (the inverse of `decoder_overrides`)."""
    return {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": intermediate_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
    }
