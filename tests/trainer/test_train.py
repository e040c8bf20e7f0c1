"""The trainer under torchrun: every layout follows the single-process loss curve and sees the
same samples."""

import pytest
import torch

from tests.trainer.runs import losses, train

STEPS = ["train.max_steps=5", "data.record_sample_ids=true", "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    return train(tmp_path_factory.mktemp("single"), data_cache, 1, *STEPS)


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["parallel.strategy=ddp"]),
        (2, ["parallel.strategy=fsdp", "parallel.tp=2"]),
        (3, ["parallel.strategy=fsdp"]),
    ],
    ids=["ddp-2", "tp-2", "fsdp-3"],
)
def test_layout_matches_single_process(tmp_path, data_cache, single, nproc, layout):
    records = train(tmp_path, data_cache, nproc, *STEPS, *layout)
    assert [r["sample_ids"] for r in records] == [r["sample_ids"] for r in single]
    assert len(single[0]["sample_ids"]) == 12
    expected = losses(single)
    torch.testing.assert_close(losses(records), expected, rtol=1e-5, atol=1e-5)
    assert expected[5] < expected[1] - 0.5, "the tiny job should visibly learn"
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records)
    assert all(0.05 < r["peak_rss_gib"] < 20 for r in records)  # the largest rank's peak RSS
