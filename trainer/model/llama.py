"""A plain-PyTorch Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention.

No parallelism lives here; `trainer.parallel.parallelize_llama` applies it from outside.
Attention reads its local head count from the weight shapes, so tensor-parallel sharding of
the projections needs no change here. RoPE uses the rotate-half convention of Hugging Face
`LlamaForCausalLM`, so `wq`/`wk` equal HF `q_proj`/`k_proj` with no permutation (see
`trainer.model.hf_names`). With `model.moe.num_experts > 0` the feed-forward of the layers
`model.moe.is_moe_layer(i)` selects is a `MoEFeedForward` (trainer/model/moe.py); the trainer adds
`model.aux_loss()` to the LM loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.init import init_parameters
from trainer.model.moe import MoEFeedForward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [seq, head_dim]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.kv_repeats = cfg.n_heads // cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(self.kv_repeats, dim=2)
        v = v.repeat_interleave(self.kv_repeats, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); HF names gate_proj=w1, down_proj=w2, up_proj=w3."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe.is_moe_layer(layer):
            self.feed_forward = MoEFeedForward(cfg.dim, cfg.expert_hidden_dim(), cfg.moe)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


# Built on the meta device, the model skips what materialising redoes (the embedding's default
# init, the RoPE tables): a meta `normal_` or `arange` runs torch's Python reference, whose
# first call imports torch._dynamo (3 s of CPU in every process that builds a model).
def _building_on_meta() -> bool:
    return torch.empty(0).is_meta


def _embedding(vocab_size: int, dim: int) -> nn.Embedding:
    if _building_on_meta():  # init_weights draws every parameter
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return nn.Embedding(vocab_size, dim)


def _model_rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)


def _rope_buffers(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if _building_on_meta():  # init_buffers computes them
        shape = (cfg.max_seq_len, cfg.dim // cfg.n_heads)
        return torch.empty(shape), torch.empty(shape)
    return _model_rope_tables(cfg)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = _embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0", "1", ... keeps names like `layers.3.attention.wq.weight`
        # and lets growth transforms insert or drop layers without renumbering modules.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        # Plain dict, not registered: the same module objects stay reachable after wrapping.
        self.moe_blocks: dict[int, MoEFeedForward] = {
            i: self.layers[str(i)].feed_forward for i in cfg.moe_layers()
        }
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = _rope_buffers(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | torch.Generator = 0) -> None:
        """Normal(0, std) init, output projections of each residual branch scaled down by depth
        (GPT-2 / torchtitan), drawn per element from (seed, name, index) (trainer/model/init.py),
        so a sharded model initialised with `init_parameters` gets the same values."""
        if isinstance(seed, torch.Generator):
            seed = seed.initial_seed()
        init_parameters(self.named_parameters(), self.cfg.init_std, self.cfg.n_layers, seed)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the RoPE tables in place (after `to_empty` of a meta-device model)."""
        cos, sin = _model_rope_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds model.max_seq_len {self.cfg.max_seq_len}"
            )
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        # A pipeline stage (trainer/parallel/pipeline.py) drops the modules it does not own:
        # then it takes / returns hidden states instead of tokens / logits.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.output(self.norm(h)) if self.output is not None else h

    def aux_loss(self) -> torch.Tensor:
        """Sum of every MoE layer's weighted load-balancing and z losses from the last forward
        (a zero tensor for a dense model); add it to the LM loss before backward."""
        total = self.rope_cos.new_zeros(())
        for block in self.moe_blocks.values():
            if block.aux_loss is not None:
                total = total + block.aux_loss + block.z_loss
        return total

    def moe_losses(self) -> dict[str, torch.Tensor]:
        """Detached per-layer losses of the last forward, e.g. `moe/aux_loss/3`, for logging."""
        out = {}
        for layer, block in self.moe_blocks.items():
            if block.aux_loss is not None:
                out[f"moe/aux_loss/{layer}"] = block.aux_loss.detach()
                out[f"moe/z_loss/{layer}"] = block.z_loss.detach()
        return out

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(_numel(p) for p in self.parameters())
        if exclude_embeddings:
            total -= _numel(self.tok_embeddings.weight)
        return total

    def active_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token uses: MoE layers count top_k of their experts."""
        total = self.num_params(exclude_embeddings)
        moe = self.cfg.moe
        for block in self.moe_blocks.values():
            per_expert = sum(_numel(p) // moe.num_experts for p in block.experts.parameters())
            total -= per_expert * (moe.num_experts - moe.top_k)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls (N = active parameters) plus 12·L·d·T for
        attention scores (PaLM appendix B, as torchtitan and Megatron count it)."""
        n = self.active_params(exclude_embeddings=True)
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.dim * seq_len


def _numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 left only an empty placeholder."""
    return getattr(param, "ds_numel", param.numel())
