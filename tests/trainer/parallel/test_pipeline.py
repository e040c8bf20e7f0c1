"""Pipeline stages: pp=2 with each schedule trains with the single-process losses."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.trainer.parallel.test_parallelize import CFG, MICRO, batches, train_losses
from trainer.model import Llama
from trainer.parallel.grad_norm import clip_grad_norm_
from trainer.parallel.pipeline import build_pipeline, split_layers, stage_module

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


def pipelined_losses(schedule):
    group = dist.group.WORLD
    batch_size = batches()[0].shape[0]
    pipe, modules = build_pipeline(fresh_model(), group, schedule, batch_size // MICRO,
                                   torch.device("cpu"))
    params = [p for m in modules for p in m.parameters()]
    optim = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    has_first = modules[0].tok_embeddings is not None
    has_last = any(m.output is not None for m in modules)
    out = []
    for batch in batches():
        losses = []
        targets = {"target": batch[:, 1:], "losses": losses} if has_last else {}
        pipe.step(batch[:, :-1], **targets) if has_first else pipe.step(**targets)
        clip_grad_norm_(params, 0.5, pp_group=group)
        optim.step()
        optim.zero_grad()
        total = torch.stack(losses).sum() if has_last else torch.zeros(())
        dist.all_reduce(total)  # only the last stage's rank adds a non-zero
        out.append(total.item())
    return out


@pytest.mark.slow
def test_pp2_each_schedule_matches_one_process():
    reference = train_losses(fresh_model())
    for schedule in ("1F1B", "GPipe", "Interleaved1F1B"):
        results = run_distributed(pipelined_losses, 2, args=(schedule,))
        assert results[0] == results[1]
        for got, want in zip(results[0], reference):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (schedule, results[0], reference)
