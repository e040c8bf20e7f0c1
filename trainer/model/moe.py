"""Mixtral-style mixture-of-experts feed-forward: a linear router and SwiGLU experts.

Experts are stored stacked, one 3-D parameter per projection (`experts.w1 [E, hidden, dim]`,
`experts.w2 [E, dim, hidden]`, `experts.w3 [E, hidden, dim]`), so the expert count is an ordinary
tensor dimension for FSDP2 and the checkpoint layer (trainer/checkpointer.py declares their
layout). Routing is dropless unless `model.moe.capacity_factor` is set. Each forward stores its
layer's coefficient-weighted load-balancing and z losses on the module (`aux_loss`, `z_loss`);
`Llama.aux_loss()` sums them for the trainer.

Names, and their Hugging Face Mixtral equivalents (expert j is row j of the stacked tensor):

    ours: layers.{i}.feed_forward.*      HF: model.layers.{i}.block_sparse_moe.*
    gate.weight        [E, dim]           gate.weight
    experts.w1[j]      [hidden, dim]      experts.{j}.w1.weight   (gate projection)
    experts.w2[j]      [dim, hidden]      experts.{j}.w2.weight   (down projection)
    experts.w3[j]      [hidden, dim]      experts.{j}.w3.weight   (up projection)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import MoEConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")
_NORM_EPS = 1e-6


class GroupedExperts(nn.Module):
    """E SwiGLU experts; expert e computes w2[e] (silu(w1[e] x) * w3[e] x)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(
        self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, capacity: int
    ) -> torch.Tensor:
        """tokens [T, dim]; experts, weights [T, k]. Each expert takes its slots in token order
        and keeps the first `capacity` of them (0 = all)."""
        top_k = experts.shape[1]
        flat_experts = experts.reshape(-1)
        flat_weights = weights.reshape(-1, 1).to(tokens.dtype)
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.w1.shape[0]).tolist()
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in enumerate(counts):
            slots = order[start : start + count]
            start += count
            if capacity:
                slots = slots[:capacity]
            if slots.numel() == 0:
                continue
            token_ids = slots // top_k
            x = tokens[token_ids]
            hidden = F.silu(x @ self.w1[expert].T) * (x @ self.w3[expert].T)
            out.index_add_(0, token_ids, (hidden @ self.w2[expert].T) * flat_weights[slots])
        return out


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden_dim, cfg.num_experts)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.gate(tokens).float()
        if self.cfg.norm_gate_logits:
            mean = logits.mean(-1, keepdim=True)
            std = logits.std(-1, keepdim=True, unbiased=False)
            logits = self.cfg.gate_logit_scale * (logits - mean) / (std + _NORM_EPS)
        return logits

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [T, E], chosen experts [T, k], their weights [T, k]) for tokens [T, dim]."""
        logits = self.router_logits(tokens)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.router == "softmax_topk_renorm":
            weights = weights / weights.sum(-1, keepdim=True)
        self.z_loss = self.cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = load_balancing_loss(probs, experts, self.cfg.aux_loss_coef)
        return probs, experts, weights

    def capacity(self, num_tokens: int) -> int:
        cf = self.cfg.capacity_factor
        return math.ceil(cf * num_tokens * self.cfg.top_k / self.cfg.num_experts) if cf else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        _, experts, weights = self.route(tokens)
        out = self.experts(tokens, experts, weights, self.capacity(tokens.shape[0]))
        return out.view_as(x)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, coef: float) -> torch.Tensor:
    """Switch loss coef * E * sum_i f_i * P_i: f_i the fraction of routed (token, slot) pairs
    sent to expert i, P_i the mean router probability of expert i. Equals coef when routing is
    uniform and coef * E when every token goes to one expert with k = 1."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return coef * num_experts * (fraction * probs.mean(0)).sum()
