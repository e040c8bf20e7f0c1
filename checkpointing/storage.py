"""DCP StorageWriter/StorageReader for the Perennial format, plus DCP planners that know ShardView.

DCP's planners do the distributed work (box per DTensor/FSDP2/TP shard, dedup of replicated
tensors across ranks, intersection of saved and wanted boxes); these classes only decide where
bytes go and verify every byte they hand back.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpointing.format import (
    CHECKSUMS,
    FAST_CHECKSUM,
    INDEX_FILE,
    STATE_FILE,
    CheckpointDamaged,
    CheckpointIndex,
    SavedBox,
    SavedTensor,
    block_checksums,
    safetensors_header,
    shard_file_name,
    tensor_bytes,
    write_json_durably,
)
from checkpointing.layout import ShardView
from checkpointing.reading import Request, ShardFiles, default_threads
from checkpointing.tiles import plan_tiles, tile_checksums


class ShardViewSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner on an already flat dict whose values may be ShardViews."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardView):
            return obj.local_at(tuple(index.offset))
        return super().lookup_object(index)


class ShardViewLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner on an already flat dict whose values may be ShardViews."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # Departs from DCP: its set_up_planner runs _init_state_dict, which replaces objects it
        # does not know (our ShardViews) with None. We never load into meta tensors anyway.
        self.original_state_dict = state_dict
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardView):
            return obj.local_at(tuple(index.offset))
        return super().lookup_tensor(index)


class SafetensorsShardWriter(StorageWriter):
    """Writes `shard-<rank>.safetensors` per rank; the coordinator writes state.json, index.json.

    The files are written by hand rather than with the safetensors library: the library needs
    every tensor materialised in one dict and reports no byte offsets, while we stream tensor by
    tensor, checksum each block in the same pass and record each box's byte range in the index.
    """

    def __init__(
        self,
        directory: Path,
        step: int,
        block_size: int,
        layouts: dict[str, dict[str, Any]],
        state: dict[str, Any],
    ) -> None:
        super().__init__()
        self.directory = directory
        self.step = step
        self.block_size = block_size
        self.layouts = layouts
        self.state = state

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [replace(plan, storage_data=shard_file_name(r)) for r, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future: Future[list[WriteResult]] = Future()
        future.set_result(self._write_file(plan, planner) if plan.items else [])
        return future

    def _write_file(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise ValueError(f"{item.index.fqn!r} is not a tensor; put it in the JSON state")
        file_name = plan.storage_data
        entries = [
            (
                f"{item.index.fqn}@{','.join(map(str, item.tensor_data.chunk.offsets))}",
                item.tensor_data.properties.dtype,
                list(item.tensor_data.chunk.sizes),
                _chunk_nbytes(item),
            )
            for item in plan.items
        ]
        header = safetensors_header(entries)
        file_info = {"size": len(header) + sum(e[3] for e in entries)}
        file_info["header_crc32"] = block_checksums(header, len(header))[0]
        results, offset = [], len(header)
        with open(self.directory / file_name, "wb") as f:
            f.write(header)
            for item, (_, _, _, nbytes) in zip(plan.items, entries):
                data = tensor_bytes(planner.resolve_data(item))
                assert len(data) == nbytes, f"{item.index.fqn}: {len(data)} != {nbytes} bytes"
                f.write(data)
                box = self._saved_box(item, data, file_name, offset)
                results.append(WriteResult(item.index, nbytes, {"box": box, "file": file_info}))
                offset += nbytes
            f.flush()
            os.fsync(f.fileno())
        return results

    def _saved_box(self, item: WriteItem, data: memoryview, file: str, offset: int) -> SavedBox:
        chunk, properties = item.tensor_data.chunk, item.tensor_data.properties
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        itemsize = properties.dtype.itemsize
        grid = plan_tiles(tuple(item.tensor_data.size), offsets, sizes, itemsize, self.block_size)
        raw = np.frombuffer(data, np.uint8)
        checksum = CHECKSUMS[FAST_CHECKSUM]
        return SavedBox(
            offsets=offsets,
            sizes=sizes,
            file=file,
            byte_offset=offset,
            byte_length=len(data),
            block_crc32=tuple(block_checksums(data, self.block_size, FAST_CHECKSUM)),
            tiles=None if grid is None else tile_checksums(raw, sizes, itemsize, grid, checksum),
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        boxes: dict[str, list[SavedBox]] = defaultdict(list)
        files: dict[str, dict[str, int]] = {}
        for rank_results in results:
            for result in rank_results:
                box = result.storage_data["box"]
                boxes[result.index.fqn].append(box)
                files[box.file] = result.storage_data["file"]
        tensors = {}
        for name, md in metadata.state_dict_metadata.items():
            assert isinstance(md, TensorStorageMetadata), f"{name} is not a tensor"
            assert len(boxes[name]) == len(md.chunks), f"{name}: boxes do not match the plan"
            tensors[name] = SavedTensor(
                shape=tuple(md.size),
                dtype=md.properties.dtype,
                boxes=tuple(sorted(boxes[name], key=lambda box: box.offsets)),
                layout=self.layouts.get(name),
            )
        index = CheckpointIndex(
            self.step, len(results), self.block_size, files, tensors, checksum=FAST_CHECKSUM
        )
        # index.json is written last: a directory with a valid index has all its shards.
        write_json_durably(self.directory / STATE_FILE, self.state)
        write_json_durably(self.directory / INDEX_FILE, index.to_json())

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def storage_meta(self) -> None:
        return None


class VerifyingShardReader(StorageReader):
    """Reads only the checksummed blocks covering what each ReadItem needs.

    Damage (missing file, short read, checksum mismatch) is recorded in `self.damage` instead of
    raised, so every rank finishes DCP's collectives and the ranks can agree on falling back.
    """

    def __init__(self, directory: Path, index: CheckpointIndex, threads: int = 0) -> None:
        super().__init__()
        self.directory = directory
        self.index = index
        self.threads = threads or default_threads()
        self.damage: str | None = None
        self.bytes_read = 0
        self._boxes = {(n, b.offsets): b for n, t in index.tensors.items() for b in t.boxes}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def read_metadata(self) -> Metadata:
        return Metadata(
            {
                name: TensorStorageMetadata(
                    TensorProperties(dtype=saved.dtype),
                    torch.Size(saved.shape),
                    [
                        ChunkStorageMetadata(torch.Size(b.offsets), torch.Size(b.sizes))
                        for b in saved.boxes
                    ],
                )
                for name, saved in self.index.tensors.items()
            }
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a, **kw) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        requests = []
        for item in plan.items:
            assert item.type == LoadItemType.TENSOR, f"{item.dest_index.fqn} is not a tensor"
            name = item.storage_index.fqn
            requests.append(
                Request(
                    name,
                    self._boxes[(name, tuple(item.storage_index.offset))],
                    tuple(item.storage_offsets),
                    tuple(item.lengths),
                    planner.resolve_tensor(item).detach(),
                )
            )
        with self.open_files() as files:
            try:
                files.read_into(requests)
            except CheckpointDamaged as err:
                self.damage = str(err)
            self.bytes_read = files.bytes_read
        if self.damage is None:
            for item, request in zip(plan.items, requests):
                planner.commit_tensor(item, request.target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def open_files(self) -> ShardFiles:
        """Where the bytes come from (a memory restore reads them from the keepers' copies)."""
        return ShardFiles(self.directory, self.index, self.threads)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


def _chunk_nbytes(item: WriteItem) -> int:
    # Not WriteItem.tensor_storage_size(): that counts the global tensor, not this chunk.
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
