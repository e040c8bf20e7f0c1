"""The MoE feed-forward: routing conventions, losses, capacity, config and model wiring."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.checkpointer import expert_layouts
from trainer.model import Llama, ModelConfig
from trainer.model.config import MoEConfig
from trainer.model.llama import FeedForward
from trainer.model.moe import MoEFeedForward, load_balancing_loss

DIM, HIDDEN = 16, 24


def identical_experts(moe: MoEFeedForward, dense: FeedForward) -> None:
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            stacked = getattr(moe.experts, name)
            stacked.copy_(getattr(dense, name).weight.expand_as(stacked))


@settings(max_examples=20, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 2**16),
    renorm=st.booleans(),
)
def test_identical_experts_give_sum_of_weights_times_ffn(num_experts, data, seed, renorm):
    top_k = data.draw(st.integers(1, num_experts))
    router = "softmax_topk_renorm" if renorm else "softmax_topk"
    torch.manual_seed(seed)
    dense = FeedForward(DIM, HIDDEN)
    moe = MoEFeedForward(DIM, HIDDEN, MoEConfig(num_experts, top_k, router=router))
    identical_experts(moe, dense)
    x = torch.randn(3, 5, DIM)
    with torch.no_grad():
        probs, _, _ = moe.route(x.reshape(-1, DIM))
        weight = 1.0 if renorm else probs.topk(top_k, -1).values.sum(-1).view(3, 5, 1)
        torch.testing.assert_close(moe(x), weight * dense(x), atol=1e-5, rtol=1e-5)


def test_aux_loss_is_alpha_when_uniform_and_alpha_e_when_collapsed():
    alpha, e = 0.01, 4
    moe = MoEFeedForward(DIM, HIDDEN, MoEConfig(e, top_k=2, aux_loss_coef=alpha))
    torch.nn.init.zeros_(moe.gate.weight)  # uniform routing
    moe(torch.randn(2, 8, DIM))
    assert moe.aux_loss.item() == pytest.approx(alpha, rel=1e-6)
    collapsed = torch.zeros(10, e)
    collapsed[:, 0] = 1.0
    experts = torch.zeros(10, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed, experts, alpha).item() == pytest.approx(alpha * e)



def test_aux_loss_through_the_layer_is_alpha_e_when_routing_collapses_with_k1():
    alpha, e = 0.01, 4
    moe = MoEFeedForward(DIM, HIDDEN, MoEConfig(e, top_k=1, aux_loss_coef=alpha, z_loss_coef=0))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2] = 100.0  # positive inputs: every token's logit for expert 2 is huge
    moe(torch.rand(2, 8, DIM) + 0.5)
    assert moe.aux_loss.item() == pytest.approx(alpha * e, rel=1e-6)

def test_z_loss_and_gate_logit_normalisation():
    cfg = MoEConfig(4, top_k=1, z_loss_coef=1e-3, norm_gate_logits=True, gate_logit_scale=3.0)
    moe = MoEFeedForward(DIM, HIDDEN, cfg)
    tokens = torch.randn(10, DIM)
    logits = moe.router_logits(tokens)
    torch.testing.assert_close(logits.mean(-1), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits.std(-1, unbiased=False), torch.full((10,), 3.0), atol=1e-4, rtol=0
    )
    moe.route(tokens)
    expected = 1e-3 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(moe.z_loss, expected)


def test_capacity_factor_drops_overflow_in_token_order():
    moe = MoEFeedForward(DIM, HIDDEN, MoEConfig(2, top_k=1, capacity_factor=1.0))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 100.0  # every token (x[:, 0] > 0) goes to expert 0
        for p in moe.experts.parameters():
            p.normal_()
    x = torch.randn(8, DIM)
    x[:, 0] = x[:, 0].abs() + 1
    out = moe(x)
    assert moe.capacity(8) == 4
    assert out[:4].abs().sum(-1).gt(0).all() and out[4:].eq(0).all()
    dropless = MoEFeedForward(DIM, HIDDEN, MoEConfig(2, top_k=1))
    dropless.load_state_dict(moe.state_dict())
    torch.testing.assert_close(dropless(x)[:4], out[:4])


def test_interleaved_model_names_losses_and_layouts():
    cfg = ModelConfig(
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=29,
        max_seq_len=8,
        moe=MoEConfig(num_experts=4, top_k=2, every_n_layers=2),
    )
    model = Llama(cfg)
    model.init_weights()
    names = dict(model.named_parameters())
    assert names["layers.0.feed_forward.w1.weight"].shape == (cfg.ffn_hidden_dim(), 32)
    assert names["layers.1.feed_forward.experts.w1"].shape == (4, cfg.ffn_hidden_dim(), 32)
    assert names["layers.3.feed_forward.gate.weight"].shape == (4, 32)
    assert cfg.moe_layers() == [1, 3] and "layers.2.feed_forward.gate.weight" not in names
    assert torch.equal(model.aux_loss(), torch.zeros(()))
    logits = model(torch.randint(0, 29, (2, 8)))
    assert sorted(model.moe_losses()) == [
        "moe/aux_loss/1",
        "moe/aux_loss/3",
        "moe/z_loss/1",
        "moe/z_loss/3",
    ]
    (logits.mean() + model.aux_loss()).backward()
    assert names["layers.1.feed_forward.gate.weight"].grad.abs().sum() > 0
    expected_active = model.num_params(True) - 2 * 2 * 3 * 32 * cfg.ffn_hidden_dim()
    assert model.active_params(True) == expected_active
    assert [s.name for s in expert_layouts(cfg)] == [
        "feed_forward.experts.w1",
        "feed_forward.experts.w2",
        "feed_forward.experts.w3",
    ]
    assert math.isfinite(model.flops_per_token(8))


@pytest.mark.parametrize(
    "moe, key",
    [
        (MoEConfig(num_experts=4, top_k=5), "model.moe.top_k"),
        (MoEConfig(num_experts=4, router="sigmoid"), "model.moe.router"),
        (MoEConfig(num_experts=-1), "model.moe.num_experts"),
        (MoEConfig(num_experts=4, every_n_layers=0), "model.moe.every_n_layers"),
        (MoEConfig(num_experts=4, capacity_factor=-1), "model.moe.capacity_factor"),
    ],
)
def test_invalid_moe_config_names_key(moe, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(moe=moe).validate()
