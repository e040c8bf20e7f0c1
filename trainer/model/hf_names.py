"""One-to-one mapping between our Llama parameter names and Hugging Face `LlamaForCausalLM`'s.

RoPE uses the same rotate-half convention on both sides, so values map with no permutation.
"""

from __future__ import annotations

import re

_LAYER_RULES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RULES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Buffers some older HF checkpoints saved; they are recomputed, never loaded.
_IGNORED_HF_NAME = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    if name in _TOP_RULES:
        return _TOP_RULES[name]
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in _LAYER_RULES:
        return f"model.layers.{match.group(1)}.{_LAYER_RULES[match.group(2)]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama name")


def from_hf_name(hf_name: str) -> str:
    for ours, theirs in _TOP_RULES.items():
        if hf_name == theirs:
            return ours
    match = _HF_LAYER_NAME.match(hf_name)
    if match:
        for ours, theirs in _LAYER_RULES.items():
            if match.group(2) == theirs:
                return f"layers.{match.group(1)}.{ours}"
    raise ValueError(f"Hugging Face tensor {hf_name!r} has no Llama parameter")


def is_ignored_hf(hf_name: str) -> bool:
    return bool(_IGNORED_HF_NAME.match(hf_name))
