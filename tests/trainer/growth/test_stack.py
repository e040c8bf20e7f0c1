"""Layer stacking: G_stack, identity block expansion, depth up-scaling, optimizer state."""

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.trainer.growth.helpers import TINY, build, full_state, load_all, save_source, trained
from tests.trainer.growth.helpers import tokens as make_tokens
from trainer.growth import parse_layer_ranges, stack, stack_tensors
from trainer.model import Llama
from trainer.model.config import MoEConfig


def layer_tensors(state: dict, layer: int) -> dict:
    prefix = f"model.layers.{layer}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def model_state(model) -> dict:
    return {"model." + k: v for k, v in model.state_dict().items()}


@settings(max_examples=10, deadline=None)
@given(n_layers=st.integers(1, 4), factor=st.integers(1, 3), seed=st.integers(0, 99))
def test_gstack_layer_k_is_source_layer_k_mod_l(n_layers, factor, seed):
    cfg = replace(TINY, n_layers=n_layers)
    state = model_state(build(cfg, seed))
    grown = stack_tensors(state, cfg, method="gstack", factor=factor)
    assert grown.model_config.n_layers == n_layers * factor
    for k in range(n_layers * factor):
        expected = layer_tensors(state, k % n_layers)
        got = layer_tensors(grown.tensors, k)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert torch.equal(grown.tensors["model.output.weight"], state["model.output.weight"])


@settings(max_examples=8, deadline=None)
@given(
    n_layers=st.integers(1, 4), every=st.integers(1, 4), seed=st.integers(0, 99), moe=st.booleans()
)
def test_identity_expansion_logits_equal_the_original(n_layers, every, seed, moe):
    cfg = replace(TINY, n_layers=n_layers)
    if moe:
        cfg = replace(cfg, moe=MoEConfig(num_experts=3, top_k=2))
    source = build(cfg, seed)
    grown = stack_tensors(model_state(source), cfg, method="interleave-identity", every=every)
    assert grown.model_config.n_layers == n_layers + n_layers // every
    model = Llama(grown.model_config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in grown.tensors.items()})
    tokens = make_tokens(seed)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "spec, n_layers, expected",
    [
        ("0:3,1:4", 4, [0, 1, 2, 1, 2, 3]),
        ("0:24,8:32", 32, list(range(24)) + list(range(8, 32))),
        ("2:3", 4, [2]),
    ],
)
def test_dus_layer_lists_are_exact(spec, n_layers, expected):
    assert parse_layer_ranges(spec, n_layers) == expected


def test_dus_tensors_follow_the_layer_list():
    state = model_state(build(TINY))
    grown = stack_tensors(state, TINY, method="dus", layers="0:2,1:3")
    assert grown.model_config.n_layers == 4
    for k, source in enumerate([0, 1, 1, 2]):
        got, expected = layer_tensors(grown.tensors, k), layer_tensors(state, source)
        assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize("spec", ["", "0:2,x", "3:1", "0:9", "0-2"])
def test_bad_layer_specs_name_the_flag(spec):
    with pytest.raises(ValueError, match="--layers"):
        parse_layer_ranges(spec, 4)


@pytest.mark.parametrize("optimizer", ["keep", "reset"])
def test_optimizer_state_after_identity_expansion(optimizer):
    source, optim_json = full_state(*trained())
    grown = stack_tensors(
        source,
        TINY,
        optimizer=optimizer,
        optimizer_json=optim_json,
        method="interleave-identity",
        every=3,
        freeze_old=True,
    )
    assert grown.model_config.frozen_layers == [0, 1, 2]
    state = grown.tensors
    old_wq = "optimizer.state.layers.2.attention.wq.weight.exp_avg"
    copy_wq = "optimizer.state.layers.3.attention.wq.weight.exp_avg"
    zeroed_wo = "optimizer.state.layers.3.attention.wo.weight"
    if optimizer == "keep":
        assert torch.equal(state[old_wq], source[old_wq]) and torch.equal(
            state[copy_wq], source[old_wq]
        )
        assert state[copy_wq.replace("exp_avg", "step")].item() == 1
    else:
        assert state[old_wq].eq(0).all() and state[copy_wq].eq(0).all()
    assert state[zeroed_wo + ".exp_avg_sq"].eq(0).all() and state[zeroed_wo + ".step"].item() == 0
    assert state["model.layers.3.attention.wo.weight"].eq(0).all()
    assert grown.optimizer_json["optimizer.param_groups.layers.3.attention.wo.weight.lr"] == 1e-3


def test_checkpoint_stack_writes_a_loadable_deeper_model(tmp_path):
    src = save_source(tmp_path / "shallow")
    out = stack(src, tmp_path / "deep", method="gstack", factor=2, optimizer="reset")
    state = json.loads((out / "state.json").read_text())["global_state"]
    assert state["phase"]["grown"]["options"]["factor"] == 2
    grown = load_all(replace(TINY, n_layers=6), out)
    source = load_all(TINY, src)
    assert torch.equal(
        grown["model.layers.4.ffn_norm.weight"], source["model.layers.1.ffn_norm.weight"]
    )
    assert grown["optimizer.state.layers.4.ffn_norm.weight.exp_avg"].eq(0).all()


def test_unsupported_stacks_are_value_errors():
    state = model_state(build(TINY))
    with pytest.raises(ValueError, match="--freeze-old"):
        stack_tensors(state, TINY, method="gstack", freeze_old=True)
    with pytest.raises(ValueError, match="--method"):
        stack_tensors(state, TINY, method="widen")
    interleaved = replace(TINY, moe=MoEConfig(num_experts=2, top_k=1, every_n_layers=2))
    with pytest.raises(ValueError, match="every_n_layers"):
        stack_tensors(model_state(build(interleaved)), interleaved, method="gstack")
