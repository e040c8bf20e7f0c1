"""Upcycling: exact at init, granular exactness, optimizer state, the written checkpoint."""

import json
import re
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from checkpointing.format import read_index
from tests.trainer.growth.helpers import STEP, TINY, build, load_all, load_model, save_source
from tests.trainer.growth.helpers import tokens as make_tokens
from trainer.growth import upcycle, upcycle_tensors
from trainer.model import Llama, ModelConfig
from trainer.model.config import MoEConfig


def grown_model(grown) -> Llama:
    model = Llama(grown.model_config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in grown.tensors.items()})
    return model


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_layers=st.integers(1, 3),
    heads=st.sampled_from([(2, 1), (4, 2), (4, 4)]),
    ffn_dim=st.sampled_from([24, 48]),
    num_experts=st.integers(1, 4),
    granularity=st.sampled_from([1, 2, 3]),
    data=st.data(),
)
def test_upcycled_logits_equal_dense(
    seed, n_layers, heads, ffn_dim, num_experts, granularity, data
):
    """Renormalised top-k, dropless: exact for G = 1 with any router, and for G > 1 with the
    virtual-group router whenever top_k is a multiple of G."""
    groups = data.draw(st.integers(1, num_experts))
    top_k = groups * granularity
    every = data.draw(st.integers(1, n_layers))
    cfg = replace(TINY, n_layers=n_layers, n_heads=heads[0], n_kv_heads=heads[1], ffn_dim=ffn_dim)
    dense = build(cfg, seed)
    tokens = make_tokens(seed)
    state = {"model." + k: v for k, v in dense.state_dict().items()}
    grown = upcycle_tensors(
        state,
        cfg,
        num_experts=num_experts,
        top_k=top_k,
        granularity=granularity,
        every_n_layers=every,
        seed=seed,
    )
    assert grown.model_config.moe.num_experts == num_experts * granularity
    with torch.no_grad():
        torch.testing.assert_close(grown_model(grown)(tokens), dense(tokens), atol=1e-5, rtol=0)


def test_virtual_group_router_and_expert_order():
    dense = build(TINY)
    state = {"model." + k: v for k, v in dense.state_dict().items()}
    grown = upcycle_tensors(state, TINY, num_experts=2, top_k=2, granularity=2).tensors
    router = grown["model.layers.0.feed_forward.gate.weight"]
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    assert not torch.equal(router[0], router[2])
    w1 = state["model.layers.0.feed_forward.w1.weight"]
    w2 = state["model.layers.0.feed_forward.w2.weight"]
    experts_w1 = grown["model.layers.0.feed_forward.experts.w1"]
    experts_w2 = grown["model.layers.0.feed_forward.experts.w2"]
    assert torch.equal(experts_w1[3], w1[24:]) and torch.equal(experts_w1[0], w1[:24])
    assert torch.equal(experts_w2[1], 2 * w2[:, 24:])  # w2 scaled by G under renormalised top-k


@pytest.mark.parametrize("optimizer", ["copy", "reset"])
def test_checkpoint_upcycle_weights_optimizer_and_state(tmp_path, optimizer):
    src = save_source(tmp_path / "dense")
    out = upcycle(src, tmp_path / "moe", num_experts=3, top_k=2, optimizer=optimizer)
    state = json.loads((out / "state.json").read_text())["global_state"]
    model_cfg = OmegaConf.create(state["config"]).model
    assert model_cfg.moe.num_experts == 3 and model_cfg.moe.top_k == 2
    assert state["step"] == STEP and state["phase"]["grown"]["kind"] == "upcycle"
    grown_cfg = ModelConfig(**{**TINY.__dict__, "moe": MoEConfig(num_experts=3, top_k=2)})
    dense = load_model(TINY, src)
    moe = load_model(grown_cfg, out)
    tokens = make_tokens(3)
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens), dense(tokens), atol=1e-5, rtol=0)

    source, grown = load_all(TINY, src), load_all(grown_cfg, out)
    prefix = "optimizer.state.layers.1.feed_forward."
    dense_moment = source[prefix + "w3.weight.exp_avg_sq"]
    expert_moment = grown[prefix + "experts.w3.exp_avg_sq"]
    if optimizer == "copy":
        assert torch.equal(expert_moment, dense_moment.expand(3, -1, -1))
        assert torch.equal(grown[prefix + "experts.w3.step"], source[prefix + "w3.weight.step"])
        assert torch.equal(
            grown["optimizer.state.norm.weight.exp_avg"],
            source["optimizer.state.norm.weight.exp_avg"],
        )
    else:
        assert expert_moment.eq(0).all() and grown[prefix + "experts.w3.step"].item() == 0
        assert grown["optimizer.state.norm.weight.exp_avg"].eq(0).all()
    # the new router starts fresh whatever the flag
    assert grown[prefix + "gate.weight.exp_avg"].eq(0).all()
    assert grown[prefix + "gate.weight.step"].item() == 0
    assert state["optimizer"]["optimizer.param_groups.layers.1.feed_forward.gate.weight.lr"] == 1e-3
    assert not any(".feed_forward.w1.weight" in key for key in state["optimizer"])
    layout = read_index(out).tensors["model.layers.0.feed_forward.experts.w2"].layout
    assert layout == {"kind": "stacked", "num_experts": 3}


def test_weights_only_source_gives_weights_only_target(tmp_path):
    src = save_source(tmp_path / "dense", with_optimizer=False)
    out = upcycle(src, tmp_path / "moe", num_experts=2, top_k=1)
    assert not any(k.startswith("optimizer.") for k in read_index(out).tensors)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"num_experts": 2, "top_k": 3}, "--top-k"),
        ({"num_experts": 2, "top_k": 3, "granularity": 2}, "multiple of --granularity"),
        ({"num_experts": 2, "top_k": 2, "granularity": 5}, "--granularity 5"),
        ({"num_experts": 2, "top_k": 2, "router_init": "zeros"}, "--router-init"),
    ],
)
def test_bad_options_are_value_errors(options, fragment):
    state = {"model." + k: v for k, v in build(TINY).state_dict().items()}
    with pytest.raises(ValueError, match=fragment):
        upcycle_tensors(state, TINY, **options)


@pytest.mark.parametrize("granularity", [1, 2])
def test_softmax_topk_is_exact_only_at_a_uniform_router_and_says_so(granularity, capsys):
    """Softmax-then-top-k (weights not renormalised): w2 is scaled so a uniform router is
    exact; the learnable router the upcycle starts from is not, and one line says how far."""
    dense, tokens = build(TINY, 0), make_tokens(0)
    state = {"model." + k: v for k, v in dense.state_dict().items()}
    grown = upcycle_tensors(state, TINY, num_experts=4, top_k=2 * granularity,
                            granularity=granularity, router="softmax_topk")  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    found = re.fullmatch(
        r"upcycle: --router softmax_topk is not function-preserving: each MoE layer computes "
        r"the dense MLP times a per-token factor in \[(\S+), (\S+)\] \(max deviation (\S+)% on "
        r"1024 probe tokens\); --router softmax_topk_renorm is exact", lines[0])
    low, high, deviation = map(float, found.groups())
    assert low < high and deviation > 0
    model = grown_model(grown)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), dense(tokens), atol=1e-5, rtol=0)
        for layer in model.layers.values():
            layer.feed_forward.gate.weight.zero_()  # uniform router
        torch.testing.assert_close(model(tokens), dense(tokens), atol=1e-5, rtol=0)


def test_renormalised_upcycle_prints_nothing(capsys):
    state = {"model." + k: v for k, v in build(TINY, 0).state_dict().items()}
    upcycle_tensors(state, TINY, num_experts=4, top_k=2)
    assert capsys.readouterr().out == ""
