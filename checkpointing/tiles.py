"""Column tiles of a saved box (format version 2): checksums a column-sliced reader can verify.

Row-major boxes keep their linear block checksums (whole-row readers verify those with no
extra pass). Boxes with >= 2 dims also get a grid of tiles, cut where the parallel layouts a
reader is likely to use split the global tensor (torch.chunk boundaries for degrees 2, 3, 4
and 8, as FSDP2 and DTensor `Shard` split) plus a regular grid so no tile exceeds a block.
A tensor-parallel rank loading `Shard(1)` columns then reads and verifies exactly its share.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right

import numpy as np

from checkpointing.format import Tiles

SPLIT_DEGREES = (2, 3, 4, 8)


def split_points(size: int, degrees: tuple[int, ...] = SPLIT_DEGREES) -> set[int]:
    """Where torch.chunk(size, n) cuts, for each n in `degrees`."""
    points = set()
    for n in degrees:
        chunk = -(-size // n)
        points.update(k * chunk for k in range(1, n) if k * chunk < size)
    return points


def geometry(sizes: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """(rows, columns, bytes per column) of a box viewed as [dim 0, dim 1, rest]."""
    rows = sizes[0] if sizes else 1
    cols = sizes[1] if len(sizes) > 1 else 1
    return rows, cols, math.prod(sizes[2:]) * itemsize


def plan_tiles(
    global_shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    itemsize: int,
    block_size: int,
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Row and column boundaries (box-relative) of a box's tiles, or None when it needs none.

    Boxes under a quarter block are left without tiles: reading them whole costs little, and
    their tiles would only grow the index.
    """
    rows, cols, inner = geometry(sizes, itemsize)
    if len(sizes) < 2 or rows * cols * inner <= block_size // 4:
        return None
    col_cuts = _inside(split_points(global_shape[1]), offsets[1], cols)
    row_bytes = cols * inner
    if row_bytes > block_size:
        col_cuts.update(range(0, cols, max(1, block_size // max(inner, 1))))
    if not col_cuts - {0}:
        return None
    row_cuts = _inside(split_points(global_shape[0]), offsets[0], rows)
    row_cuts.update(range(0, rows, max(1, block_size // row_bytes)))
    return tuple(sorted(row_cuts | {rows})), tuple(sorted(col_cuts | {cols}))


def _inside(points: set[int], offset: int, size: int) -> set[int]:
    return {0} | {p - offset for p in points if offset < p < offset + size}


def tile_checksums(
    data: np.ndarray, sizes: tuple[int, ...], itemsize: int, grid, checksum
) -> Tiles:
    """Checksums of every tile of a box whose raw bytes are `data` (uint8, row-major)."""
    row_cuts, col_cuts = grid
    rows, cols, inner = geometry(sizes, itemsize)
    view = data.reshape(rows, cols * inner)
    crcs = []
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        band = view[r0:r1]
        for c0, c1 in zip(col_cuts, col_cuts[1:]):
            crcs.append(checksum(np.ascontiguousarray(band[:, c0 * inner : c1 * inner])))
    return Tiles(row_cuts, col_cuts, tuple(crcs))


def covering(cuts: tuple[int, ...], start: int, stop: int) -> range:
    """Indices of the tile bands [cuts[i], cuts[i + 1]) that intersect [start, stop)."""
    return range(bisect_right(cuts, start) - 1, bisect_left(cuts, stop))
