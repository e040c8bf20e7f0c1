"""Partial reads of a saved box return exactly the requested region, verified block by block."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointing import CheckpointManager
from checkpointing.format import read_index
from checkpointing.reading import ShardFiles


@st.composite
def regions(draw):
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    offsets = [draw(st.integers(0, size - 1)) for size in shape]
    lengths = [draw(st.integers(1, size - off)) for size, off in zip(shape, offsets)]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8]))
    block_size = draw(st.sampled_from([64, 128, 4096]))
    return shape, offsets, lengths, dtype, block_size


@settings(max_examples=40, deadline=None)
@given(regions())
def test_read_region_matches_slicing(region):
    shape, offsets, lengths, dtype, block_size = region
    tensor = (torch.arange(torch.Size(shape).numel()) % 251).reshape(shape).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = CheckpointManager(tmp, block_size=block_size).save(1, {"t": tensor})
        index = read_index(Path(path))
        with ShardFiles(Path(path), index) as files:
            got = files.read_region("t", (0,) * len(shape), tuple(offsets), tuple(lengths))
    want = tensor
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        want = want.narrow(dim, offset, length)
    assert torch.equal(got, want)
