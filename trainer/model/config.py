"""Model hyperparameters (`model.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTERS = ("softmax_topk_renorm", "softmax_topk")


@dataclass
class MoEConfig:
    """Mixtral-style mixture-of-experts feed-forward (`model.moe.*`); see trainer/model/moe.py."""

    num_experts: int = 0
    """Experts per MoE layer; 0 = a dense model (no MoE layers)."""
    top_k: int = 2
    """Experts each token is routed to."""
    every_n_layers: int = 1
    """Layer i is MoE when (i + 1) % every_n_layers == 0: 1 = every layer (Mixtral), 2 = layers
    1, 3, 5, ... (odd layers MoE, even layers dense)."""
    router: str = "softmax_topk_renorm"
    """softmax_topk_renorm: softmax, top-k, renormalise the k weights to sum 1 (Mixtral);
    softmax_topk: softmax then top-k, weights not renormalised (Switch / T5X)."""
    norm_gate_logits: bool = False
    """Skywork-MoE gating-logit normalisation: standardise router logits over the experts and
    multiply by gate_logit_scale before the softmax."""
    gate_logit_scale: float = 1.0
    """The scale lambda of norm_gate_logits (larger = sharper routing)."""
    aux_loss_coef: float = 1e-2
    """Switch load-balancing loss coefficient alpha: alpha * E * sum_i f_i * P_i per layer."""
    z_loss_coef: float = 1e-3
    """Router z-loss coefficient: coef * mean(logsumexp(logits)^2) per layer."""
    capacity_factor: float = 0.0
    """0 = dropless; > 0 caps each expert at ceil(cf * tokens * top_k / E) tokens per batch and
    drops the overflow (those tokens skip the expert; the residual carries them)."""
    hidden_dim: int = 0
    """Hidden size of each expert; 0 = the dense feed-forward's (model.ffn_dim)."""

    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.enabled() and (layer + 1) % self.every_n_layers == 0

    def validate(self) -> None:
        for key in ("num_experts", "hidden_dim"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.moe.{key} must be >= 0, got {getattr(self, key)}")
        if self.router not in ROUTERS:
            raise ValueError(f"model.moe.router must be one of {ROUTERS}, got {self.router!r}")
        for key in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.moe.{key} must be >= 0, got {getattr(self, key)}")
        if self.every_n_layers < 1:
            raise ValueError(f"model.moe.every_n_layers must be >= 1, got {self.every_n_layers}")
        if self.gate_logit_scale <= 0:
            raise ValueError(f"model.moe.gate_logit_scale must be > 0, got {self.gate_logit_scale}")
        if self.enabled() and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"model.moe.top_k must be in [1, model.moe.num_experts={self.num_experts}], "
                f"got {self.top_k}"
            )


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
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts feed-forward layers (num_experts 0 = dense)."""
    frozen_layers: list[int] = field(default_factory=list)
    """Layers whose parameters are not trained (requires_grad False), e.g. the original blocks
    after `perennial grow stack --method interleave-identity --freeze-old`."""

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.moe.is_moe_layer(i)]

    def expert_hidden_dim(self) -> int:
        return self.moe.hidden_dim or self.ffn_hidden_dim()

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
        self.moe.validate()
        bad = [i for i in self.frozen_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"model.frozen_layers: {bad} out of range [0, {self.n_layers})")
