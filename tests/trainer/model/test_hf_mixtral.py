"""MoE checkpoints export as Hugging Face Mixtral; transformers loads them with our logits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

from launch.cli import main
from tests.trainer.growth.helpers import TINY, load_model, save_source
from trainer.growth import upcycle
from trainer.model import Llama
from trainer.model.config import MoEConfig
from trainer.model.hf import from_hf, model_config_from_dict, model_config_to_hf, to_hf
from trainer.model.hf_export import export_hf
from trainer.model.hf_io import import_hf_checkpoint

MOE = replace(TINY, moe=MoEConfig(num_experts=4, top_k=2))


def batch(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (2, 12), generator=generator)


def hf_logits(out) -> torch.Tensor:
    model = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        return model(batch()).logits


def our_logits(model: Llama) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch())


def test_upcycled_checkpoint_exports_as_mixtral(tmp_path, capsys):
    src = save_source(tmp_path / "dense")
    grown = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2)
    argv = ["ckpt", "export", str(tmp_path / "moe"), str(tmp_path / "hf"), "--format", "hf"]
    assert main([*argv, "--max-shard-size", "20KB"]) == 0
    assert "model-00001-of-" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "model.layers.2.block_sparse_moe.experts.3.w2.weight" in weight_map["weight_map"]
    ours = load_model(MOE, grown)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), our_logits(ours), atol=1e-5, rtol=0)


def test_distinct_experts_keep_their_order_and_projections(tmp_path):
    """A trained MoE (every expert different): w1/w3/w2 and expert j must land in place."""
    src = save_source(tmp_path / "moe", MOE)
    export_hf(src, tmp_path / "hf")
    ours = load_model(MOE, src)
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    assert torch.equal(w3, ours.layers["1"].feed_forward.experts.w3[2].detach())
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), our_logits(ours), atol=1e-5, rtol=0)


def test_exported_mixtral_imports_back(tmp_path):
    src = save_source(tmp_path / "moe", replace(MOE, tie_embeddings=True))
    export_hf(src, tmp_path / "hf", max_shard_size="30KB")
    path = import_hf_checkpoint(tmp_path / "hf", tmp_path / "back")
    state = json.loads((path / "state.json").read_text())["global_state"]
    saved_cfg = model_config_from_dict(yaml.safe_load(state["config"])["model"])
    assert saved_cfg == replace(MOE, tie_embeddings=True, moe=replace(MOE.moe, aux_loss_coef=1e-2))
    back = load_model(saved_cfg, path)
    torch.testing.assert_close(our_logits(back), hf_logits(tmp_path / "hf"), atol=1e-5, rtol=0)


def test_fused_transformers_state_dict_maps_to_ours():
    """transformers 5 holds experts fused (gate_up_proj, down_proj); both directions agree."""
    hf_config = model_config_to_hf({**MOE.__dict__, "moe": MOE.moe.__dict__})
    hf_model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf_config)).eval()
    assert any(name.endswith("gate_up_proj") for name in hf_model.state_dict())
    ours = Llama(MOE)
    ours.load_state_dict(from_hf(hf_model.state_dict(), "mixtral"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours), hf_model(batch()).logits, atol=1e-5, rtol=0)
    per_expert = to_hf(dict(ours.named_parameters()), "mixtral")
    assert from_hf(per_expert, "mixtral").keys() == dict(ours.named_parameters()).keys()


@pytest.mark.parametrize(
    "moe, setting",
    [
        (MoEConfig(num_experts=2, top_k=1, every_n_layers=2), "model.moe.every_n_layers=2"),
        (MoEConfig(num_experts=2, top_k=1, router="softmax_topk"), "model.moe.router"),
        (MoEConfig(num_experts=2, top_k=1, norm_gate_logits=True), "model.moe.norm_gate_logits"),
    ],
)
def test_settings_mixtral_cannot_express_are_refused(tmp_path, moe, setting):
    src = save_source(tmp_path / "moe", replace(TINY, moe=moe))
    with pytest.raises(ValueError, match=setting):
        export_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
