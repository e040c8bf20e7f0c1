"""A contiguous range of a flattened tensor, as the global boxes DCP plans and our format stores.

ZeRO keeps every parameter as a slice of one flat buffer, so a rank holds elements
[start, start + numel) of the flattened parameter. In row-major order such a range is at most a
partial first row, some full rows and a partial last row (recursively for more dims):

    shape (4, 10), start 7, numel 18  ->  (0, 7) size (1, 3);  (1, 0) size (1, 10);
                                          (2, 0) size (1, 5)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from checkpointing.layout import ShardView

Box = tuple[tuple[int, ...], tuple[int, ...]]


def flat_range_boxes(shape: tuple[int, ...], start: int, numel: int) -> list[Box]:
    """(offsets, sizes) of the boxes covering flat elements [start, start + numel), in order."""
    assert 0 <= start and start + numel <= math.prod(shape), (shape, start, numel)
    if numel == 0:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (numel,) * len(shape))]
    inner = math.prod(shape[1:])
    end = start + numel
    row, skip = divmod(start, inner)
    boxes: list[Box] = []
    if skip:
        take = min(inner - skip, numel)
        boxes += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], skip, take)]
        start, row = start + take, row + 1
    full_rows = (end - start) // inner
    if full_rows:
        boxes.append(((row,) + (0,) * (len(shape) - 1), (full_rows, *shape[1:])))
        start, row = start + full_rows * inner, row + full_rows
    if end > start:
        boxes += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, end - start)]
    return boxes


class FlatRangeView(ShardView):
    """Elements [start, start + flat.numel()) of a tensor of `global_shape`, held in the 1-D
    view `flat` (a slice of a ZeRO partition, or of a memory-mapped file). Saving reads from
    `flat`; loading writes into it. Every box is a contiguous piece of `flat`."""

    def __init__(self, flat: torch.Tensor, start: int, global_shape: tuple[int, ...]) -> None:
        assert flat.dim() == 1, f"expected a flat view, got shape {tuple(flat.shape)}"
        shape = tuple(global_shape)
        boxes = flat_range_boxes(shape, start, flat.numel())
        self._views: dict[tuple[int, ...], torch.Tensor] = {}
        used = 0
        for offsets, sizes in boxes:
            count = math.prod(sizes)
            self._views[offsets] = flat.narrow(0, used, count).view(sizes)
            used += count
        first = next(iter(self._views.values()), flat)
        super().__init__(local=first, offsets=boxes[0][0] if boxes else (0,) * len(shape),
                         global_shape=shape)
        self.flat = flat

    def local_at(self, offsets: tuple[int, ...]) -> torch.Tensor:
        return self._views[tuple(offsets)]

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        items = []
        for offsets, view in self._views.items():
            data = TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(offsets), view.size()),
                properties=TensorProperties.create_from_tensor(view),
                size=self.size(),
            )
            index = MetadataIndex(fqn, offsets)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
        return items

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(torch.Size(offsets), view.size())
            for offsets, view in self._views.items()
        ]
