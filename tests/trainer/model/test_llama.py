import pytest
import torch

from trainer.model import Llama, ModelConfig
from trainer.model.hf_names import from_hf_name, to_hf_name

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    model = Llama(TINY)
    model.init_weights()
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 97)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    assert torch.equal(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_names_map_one_to_one_onto_hf():
    model = Llama(TINY)
    names = [n for n, _ in model.named_parameters()]
    hf = [to_hf_name(n) for n in names]
    assert len(set(hf)) == len(names)
    assert [from_hf_name(h) for h in hf] == names
    with pytest.raises(ValueError, match="layers.0.bogus"):
        to_hf_name("layers.0.bogus")


def test_logits_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=TINY.ffn_hidden_dim(),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=TINY.norm_eps,
        rope_theta=TINY.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = Llama(TINY)
    hf_state = hf_model.state_dict()
    ours.load_state_dict({n: hf_state[to_hf_name(n)] for n, _ in ours.named_parameters()})
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-5, rtol=1e-5)


def test_invalid_model_config_names_key():
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelConfig(dim=64, n_heads=5).validate()
