"""Pipeline stages keep the plain model's names and split the layers evenly, earlier stages
first. (Each schedule training with the one-process losses: test_pipeline_train.py, through
`perennial train`.)"""

from dataclasses import replace

import torch

from tests.trainer.parallel.test_parallelize import CFG
from trainer.model import Llama
from trainer.parallel.pipeline import RankStages, split_layers, stage_module

PP_CFG = replace(CFG, n_layers=5)  # uneven: 3 + 2 layers, or 2 + 1 + 1 + 1 interleaved


def fresh_model():
    model = Llama(PP_CFG)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_split_layers_is_contiguous_and_uneven_first():
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(5, 4) == [[0, 1], [2], [3], [4]]


def test_stages_keep_the_plain_parameter_names():
    model = fresh_model()
    names = [set(dict(stage_module(model, s, 2).named_parameters())) for s in range(2)]
    assert names[0] | names[1] == set(dict(model.named_parameters()))
    assert not names[0] & names[1]
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[1]


def test_rank_stages_show_the_plain_names_of_their_stages():
    """Interleaved: rank 0 of pp=2 holds stages 0 and 2 of 4 as one module (no copies)."""
    model = fresh_model()
    modules = [stage_module(model, s, 4) for s in (0, 2)]
    rank = RankStages(None, modules, None, torch.device("cpu"))
    expected = {name for m in modules for name in dict(m.named_parameters())}
    assert set(dict(rank.named_parameters())) == expected
    assert "tok_embeddings.weight" in expected and "layers.3.attention.wq.weight" in expected
    assert rank.has_first and not rank.has_last
    assert rank.layers["3"] is modules[1].layers["3"]
