"""Mixtral-style mixture-of-experts feed-forward: a linear router and SwiGLU experts.

Experts are stored stacked, one 3-D parameter per projection (`experts.w1 [E, hidden, dim]`,
`experts.w2 [E, dim, hidden]`, `experts.w3 [E, hidden, dim]`), so the expert count is an ordinary
tensor dimension for FSDP2 and the checkpoint layer (trainer/checkpointer.py declares their
layout). Routing is dropless unless `model.moe.capacity_factor` is set. Each forward stores its
layer's coefficient-weighted load-balancing and z losses on the module (`aux_loss`, `z_loss`);
`Llama.aux_loss()` sums them for the trainer. The experts run either as a per-expert loop or as
one grouped computation over a padded batch without host syncs (`MoEFeedForward.uses_grouped`:
with a capacity factor, expert parallelism or torch.compile); both give the same numbers.

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
from torch.distributed.tensor import DTensor

from trainer.model.config import MoEConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")
_NORM_EPS = 1e-6


class GroupedExperts(nn.Module):
    """E SwiGLU experts; expert e computes w2[e] (silu(w1[e] x) * w3[e] x).

    The forward takes a padded batch `[experts, rows, dim]` (row r of expert e is one routed
    token or zero padding) and runs all experts as three batched matmuls. Under expert
    parallelism (trainer/parallel/expert_parallel.py) the parameters are DTensors sharded on the
    expert dimension and the batch arriving here holds only this rank's experts.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    grad_scale = 1.0
    """Factor on the weights' gradients only (expert parallelism: 1 / ep, see apply_ep)."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """[experts, rows, dim] -> [experts, rows, dim]."""
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        if self.grad_scale != 1.0:
            w1, w2, w3 = (_ScaleGrad.apply(w, self.grad_scale) for w in (w1, w2, w3))
        hidden = F.silu(batch @ w1.transpose(1, 2)) * (batch @ w3.transpose(1, 2))
        return hidden @ w2.transpose(1, 2)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def slot_rows(experts: torch.Tensor, num_experts: int, rows: int) -> torch.Tensor:
    """For each routed slot (token t, choice j) in token order, its row in a padded
    `[num_experts * rows]` batch: expert * rows + its rank among that expert's slots. Slots past
    `rows` (capacity drops) point at the spare row `num_experts * rows`. Sizes never depend on
    the routing, so nothing waits for the host (no `.tolist()`), and torch.compile can trace it."""
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = expert_counts(flat, num_experts)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    spare = torch.full_like(rank, num_experts * rows)
    return torch.where(rank < rows, flat * rows + rank, spare)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert (a static-shape bincount)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def per_expert_loop(
    experts_module: GroupedExperts,
    tokens: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """The reference computation: a Python loop over experts, each taking its slots in token
    order and keeping the first `capacity` (0 = all). Needs the counts on the host; kept for the
    equality test and the benchmark against the grouped path."""
    top_k = experts.shape[1]
    flat_experts = experts.reshape(-1)
    flat_weights = weights.reshape(-1, 1).to(tokens.dtype)
    order = flat_experts.argsort(stable=True)
    counts = expert_counts(flat_experts, experts_module.w1.shape[0]).tolist()
    out = torch.zeros_like(tokens)
    start = 0
    for expert, count in enumerate(counts):
        slots = order[start : start + count][: capacity or None]
        start += count
        token_ids = slots // top_k
        x = tokens[token_ids]
        w1, w2, w3 = (_local(getattr(experts_module, name))[expert] for name in EXPERT_WEIGHTS)
        y = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        out.index_add_(0, token_ids, y * flat_weights[slots])
    return out


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden_dim, cfg.num_experts)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.expert_parallel = False  # set by trainer.parallel.expert_parallel.apply_ep

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
        self.tokens_per_expert = expert_counts(experts, self.cfg.num_experts).detach()
        return probs, experts, weights

    def capacity(self, num_tokens: int) -> int:
        cf = self.cfg.capacity_factor
        return math.ceil(cf * num_tokens * self.cfg.top_k / self.cfg.num_experts) if cf else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        _, experts, weights = self.route(tokens)
        capacity = self.capacity(tokens.shape[0])
        if self.uses_grouped():
            out = self.grouped(tokens, experts, weights, capacity)
        else:
            out = per_expert_loop(self.experts, tokens, experts, weights, capacity)
        return out.view_as(x)

    def uses_grouped(self) -> bool:
        """The grouped path runs with a capacity factor (its padding is then small), under
        expert parallelism (the all-to-all needs static shapes) and under torch.compile (no
        host sync in the graph). Dropless eager keeps the loop: the padded batch would be
        E/k times the loop's expert FLOPs (see docs/benchmarks.md, MoE grouped experts)."""
        return bool(
            self.cfg.capacity_factor
            or self.expert_parallel
            or torch.compiler.is_compiling()
        )

    def grouped(
        self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, capacity: int
    ) -> torch.Tensor:
        """Scatter the slots into a padded [E, rows, dim] batch, run the experts on it, gather
        each slot's output back and sum a token's k slots by their router weights. rows = the
        capacity, or every token when dropless (an expert takes a token at most once)."""
        num_tokens, num_experts = tokens.shape[0], self.cfg.num_experts
        rows = min(capacity or num_tokens, num_tokens)
        dest = slot_rows(experts, num_experts, rows)
        slot_tokens = tokens.repeat_interleave(self.cfg.top_k, dim=0)
        batch = tokens.new_zeros(num_experts * rows + 1, tokens.shape[1])
        batch = batch.index_copy(0, dest, slot_tokens)[:-1]
        out = self.experts(batch.view(num_experts, rows, -1)).reshape(num_experts * rows, -1)
        out = torch.cat([out, out.new_zeros(1, out.shape[1])])  # the spare row stays zero
        slots = out[dest] * weights.reshape(-1, 1).to(out.dtype)
        return slots.view(num_tokens, self.cfg.top_k, -1).sum(1)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, coef: float) -> torch.Tensor:
    """Switch loss coef * E * sum_i f_i * P_i: f_i the fraction of routed (token, slot) pairs
    sent to expert i, P_i the mean router probability of expert i. Equals coef when routing is
    uniform and coef * E when every token goes to one expert with k = 1."""
    num_experts = probs.shape[-1]
    counts = expert_counts(experts, num_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return coef * num_experts * (fraction * probs.mean(0)).sum()
