"""Expert parallelism and the grouped expert computation: the same numbers as the per-expert
loop and as the unsharded model, on real gloo ranks."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.distributed import run_distributed
from tests.trainer.parallel.test_parallelize import CFG, batches, train_losses
from trainer.model import Llama
from trainer.model.config import MoEConfig
from trainer.model.moe import MoEFeedForward, per_expert_loop
from trainer.parallel.dims import ParallelDims
from trainer.parallel.parallelize import parallelize_llama

MOE_CFG = replace(CFG, moe=MoEConfig(num_experts=4, top_k=2))


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, 0.5])
def test_grouped_experts_equal_the_per_expert_loop(capacity_factor):
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, MoEConfig(4, 2, capacity_factor=capacity_factor))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(3, 7, 16, requires_grad=True)
    tokens = x.reshape(-1, 16)
    _, experts, weights = moe.route(tokens)
    grouped = moe.grouped(tokens, experts, weights, moe.capacity(tokens.shape[0]))
    looped = per_expert_loop(moe.experts, tokens, experts, weights, moe.capacity(tokens.shape[0]))
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(grouped)
    grads = torch.autograd.grad((grouped * probe).sum(), [x, moe.experts.w2], retain_graph=True)
    expected = torch.autograd.grad((looped * probe).sum(), [x, moe.experts.w2])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouped_experts_compile_without_graph_breaks():
    moe = MoEFeedForward(16, 24, MoEConfig(4, 2))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x))  # compiled: grouped; eager: the loop
    eager_share = moe.tokens_per_expert
    compiled(x)
    assert torch.equal(moe.tokens_per_expert, eager_share) and eager_share.sum() == 2 * 5 * 2


def fresh_moe_model():
    model = Llama(MOE_CFG)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def expert_parallel_losses(ep):
    dims = ParallelDims(dist.get_world_size(), strategy="fsdp", ep=ep)
    dims.build_mesh("cpu")
    model = parallelize_llama(fresh_moe_model(), dims)
    w1 = model.layers["0"].feed_forward.experts.w1
    assert isinstance(w1, DTensor) and w1.shape == (4, 96, 32)  # the global stacked tensor
    assert w1.to_local().shape[0] == 4 // ep // (dims.dp // ep)
    first_grad = expert_gradient(model, dims.dp_rank(), dims.dp).tolist()
    losses = train_losses(model, dims.dp_rank(), dims.dp, dims["dp"].get_group())
    return first_grad, losses


def expert_gradient(model, dp_rank=0, dp=1):
    """d loss / d experts.w1 of layer 0 for the first batch, as one global tensor."""
    batch = batches()[0].chunk(dp)[dp_rank]
    logits = model(batch[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    grad = model.layers["0"].feed_forward.experts.w1.grad
    grad = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    model.zero_grad()
    return grad


def test_ep2_matches_one_process():
    reference_model = fresh_moe_model()
    reference_grad = expert_gradient(reference_model)
    reference = train_losses(reference_model)
    results = run_distributed(expert_parallel_losses, 2, args=(2,))
    grad, losses = results[0]
    torch.testing.assert_close(torch.tensor(grad), reference_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5)
    assert losses == results[1][1]
    assert reference[-1] < reference[0]


@pytest.mark.slow
def test_ep2_inside_dp4_matches_one_process():
    """dp_mod_ep = 2: experts also FSDP-sharded and reduced across the two ep groups. The
    training losses are not compared: 3 sequences per rank split into micro batches of 2 and 1,
    which train_losses weights equally (unlike one process); the gradient is compared."""
    reference_grad = expert_gradient(fresh_moe_model())
    results = run_distributed(expert_parallel_losses, 4, args=(2,))
    grad, losses = results[0]
    torch.testing.assert_close(torch.tensor(grad), reference_grad, rtol=1e-5, atol=1e-6)
    assert all(result[1] == losses for result in results) and losses[-1] < losses[0]
