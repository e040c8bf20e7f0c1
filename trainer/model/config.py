"""Model hyperparameters (`model.*`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    name: str = "llama"
    """Model family. Only `llama` for now."""
    dim: int = 256
    """Width of the residual stream (HF `hidden_size`)."""
    n_layers: int = 4
    """Number of transformer blocks (HF `num_hidden_layers`)."""
    n_heads: int = 8
    """Attention query heads (HF `num_attention_heads`); must divide `dim`."""
    n_kv_heads: int = 4
    """Key/value heads for grouped-query attention (HF `num_key_value_heads`); divides n_heads."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes the tokenizer's."""
    ffn_dim: int = 0
    """SwiGLU hidden size (HF `intermediate_size`); 0 derives it Llama-style from dim."""
    multiple_of: int = 64
    """When ffn_dim is derived, round it up to a multiple of this."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (HF `rms_norm_eps`)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (HF `rope_theta`)."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables cover (HF `max_position_embeddings`)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection (HF `tie_word_embeddings`)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""

    def ffn_hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.name != "llama":
            raise ValueError(f"model.name: unknown model {self.name!r}; available: llama")
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"model.dim / model.n_heads ({self.dim // self.n_heads}) must be even for RoPE"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by "
                f"model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.vocab_size < 0 or self.ffn_dim < 0:
            raise ValueError("model.vocab_size and model.ffn_dim must be >= 0 (0 = derive)")
