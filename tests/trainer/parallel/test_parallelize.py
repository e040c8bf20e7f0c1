"""parallelize_llama: every layout reproduces the single-process loss curve."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_distributed
from trainer.model import Llama, ModelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.grad_norm import clip_grad_norm_
from trainer.parallel.parallelize import parallelize_llama, set_gradient_sync

# Uneven on purpose: vocab 101 and ffn 96 do not split evenly over 3 ranks.
CFG = ModelConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_dim=96, max_seq_len=16
)
GLOBAL_BATCH, MICRO, STEPS = 12, 2, 5


def batches():
    # One batch seen every step: the loss must fall, so a layout that drops gradients shows.
    batch = torch.randint(
        0, CFG.vocab_size, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(7)
    )
    return [batch] * STEPS


def train_losses(model, dp_rank=0, dp=1, group=None):
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for batch in batches():
        local = batch.chunk(dp)[dp_rank]
        micros = local.split(MICRO)
        total = torch.zeros(())
        for i, micro in enumerate(micros):
            set_gradient_sync(model, i == len(micros) - 1)
            logits = model(micro[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten()) / len(micros)
            loss.backward()
            total += loss.detach()
        clip_grad_norm_(model.parameters(), 0.5)
        optim.step()
        optim.zero_grad()
        if group is not None:
            dist.all_reduce(total, group=group)
            total /= dist.get_world_size(group)
        losses.append(total.item())
    return losses


def fresh_model():
    model = Llama(CFG)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def layouts_on_ranks(layouts):
    results = {}
    for strategy, tp in layouts:
        dims = ParallelDims(dist.get_world_size(), tp=tp, strategy=strategy)
        dims.build_mesh("cpu")
        model = parallelize_llama(fresh_model(), dims)
        results[f"{strategy}-tp{tp}"] = train_losses(
            model, dims.dp_rank(), dims.dp, dims["dp"].get_group()
        )
    return results


@pytest.fixture(scope="module")
def reference():
    return train_losses(fresh_model())


def test_two_rank_layouts_match_single_process(reference):
    results = run_distributed(layouts_on_ranks, 2, args=([("ddp", 1), ("fsdp", 1), ("fsdp", 2)],))
    for name, losses in results[0].items():
        torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5, msg=name)
    assert reference[-1] < reference[0]


def test_three_rank_fsdp_with_uneven_shards_matches(reference):
    results = run_distributed(layouts_on_ranks, 3, args=([("fsdp", 1)],))
    torch.testing.assert_close(results[0]["fsdp-tp1"], reference, rtol=1e-5, atol=1e-5)


def test_four_rank_fsdp_x_tp_mesh_matches(reference):
    results = run_distributed(layouts_on_ranks, 4, args=([("fsdp", 2)],))
    torch.testing.assert_close(results[0]["fsdp-tp2"], reference, rtol=1e-5, atol=1e-5)
