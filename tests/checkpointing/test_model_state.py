"""Flattening model + optimizer state for the checkpoint layer, without side effects."""

from __future__ import annotations

import torch
from torch import nn

from checkpointing import optimizer_tensors
from checkpointing.model_state import OptimizerValues


def _model_and_adamw(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model, optimizer, steps: int = 3) -> None:
    for step in range(steps):
        inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_reading_a_fresh_optimizer_does_not_change_training():
    plain, plain_opt = _model_and_adamw()
    read, read_opt = _model_and_adamw()
    tensors, _ = optimizer_tensors(read, read_opt)  # what a resume attempt does before step 1
    assert all(t.item() == 0 for k, t in tensors.items() if k.endswith(".step"))
    _train(plain, plain_opt)
    _train(read, read_opt)
    for (name, a), b in zip(plain.state_dict().items(), read.state_dict().values()):
        assert torch.equal(a, b), name
    steps = {k: t.item() for k, t in optimizer_tensors(read, read_opt)[0].items()
             if k.endswith(".step")}
    assert set(steps.values()) == {3.0}


def test_optimizer_values_follow_the_live_groups():
    model, optimizer = _model_and_adamw()
    optimizer.add_param_group({"params": [], "lr": 3e-3})  # an empty group flattens to nothing
    _train(model, optimizer, steps=1)
    tensors, values = optimizer_tensors(model, optimizer)
    live = OptimizerValues(model, optimizer)
    assert live() == values and "optimizer.param_groups.0.weight.betas" in values
    optimizer.param_groups[0]["lr"] = 5e-4  # what a schedule does each step
    _train(model, optimizer, steps=1)
    again, values = optimizer_tensors(model, optimizer)
    assert live() == values and values["optimizer.param_groups.2.bias.lr"] == 5e-4
    assert all(again[k] is tensors[k] for k in tensors)  # the state is updated in place
