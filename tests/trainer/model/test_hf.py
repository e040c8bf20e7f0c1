"""The Hugging Face adapter: names, configs, and import checked against transformers' logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from checkpointing import CheckpointManager, apply_model_tensors, model_tensors
from trainer.model import Llama
from trainer.model.hf import (
    from_hf,
    hf_config_to_model_overrides,
    model_config_from_dict,
    model_config_to_hf,
    to_hf,
)
from trainer.model.hf_io import hf_model_overrides, import_hf_checkpoint, is_hf_dir

TINY_HF = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
)


def save_tiny_hf(path: Path, tied: bool = False, shard: str | None = None, seed: int = 0):
    """A randomly initialised tiny LlamaForCausalLM saved with save_pretrained; returns it."""
    config = transformers.LlamaConfig(**TINY_HF, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model


def load_ours(checkpoint: Path) -> Llama:
    """Our Llama with the weights of a checkpoint (dir/root/run dir) and its saved config."""
    result = CheckpointManager(checkpoint).load(checkpoint, {})
    model = Llama(model_config_from_dict(yaml.safe_load(result.global_state["config"])["model"]))
    tensors = model_tensors(model)
    CheckpointManager(checkpoint).load(checkpoint, tensors)
    apply_model_tensors(model, tensors)
    return model.eval()


def assert_same_logits(ours: Llama, theirs, vocab: int = 320) -> None:
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tied, shard", [(False, None), (True, None), (False, "60KB"), (True, "60KB")]
)
def test_import_gives_transformers_logits(tmp_path, tied, shard):
    hf_model = save_tiny_hf(tmp_path / "hf", tied, shard)
    assert is_hf_dir(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == bool(shard)
    checkpoint = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    assert checkpoint.name == "step-00000000"
    ours = load_ours(tmp_path / "ckpt")
    assert ours.cfg.tie_embeddings == tied
    assert_same_logits(ours, hf_model)


def test_pytorch_model_bin_imports(tmp_path):
    hf_model = save_tiny_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    assert_same_logits(load_ours(tmp_path / "ckpt"), hf_model)


def test_state_dict_mapping_round_trips_and_loads_into_transformers():
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF))
    ours = Llama(model_config_from_dict(hf_config_to_model_overrides(hf_model.config.to_dict())))
    ours.init_weights(torch.Generator().manual_seed(3))
    state = dict(ours.named_parameters())
    assert from_hf(to_hf(state)) == state
    hf_model.load_state_dict(to_hf(state), strict=True)
    assert_same_logits(ours.eval(), hf_model.eval())


def test_config_mapping_round_trips():
    overrides = hf_config_to_model_overrides(transformers.LlamaConfig(**TINY_HF).to_dict())
    assert overrides == {
        "name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "vocab_size": 320, "ffn_dim": 96, "norm_eps": 1e-6, "rope_theta": 50000.0,
        "max_seq_len": 64, "tie_embeddings": False,
    }  # fmt: skip
    hf_json = model_config_to_hf(overrides, torch.bfloat16, bos_token_id=1, eos_token_id=2)
    assert hf_json["architectures"] == ["LlamaForCausalLM"] and hf_json["dtype"] == "bfloat16"
    assert hf_config_to_model_overrides(hf_json) == overrides
    # a 4.x-style config.json: top-level rope_theta, no head_dim
    legacy = {"model_type": "llama", **TINY_HF, "rope_theta": 1e6}
    assert hf_config_to_model_overrides(legacy)["rope_theta"] == 1e6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
            "rope_type 'llama3'",
        ),
        ({"attention_bias": True}, "attention_bias"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused(tmp_path, change, message):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY_HF, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        hf_model_overrides(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)
