"""Host staging for non-blocking saves: one copy of this rank's state into buffers allocated
on the first save and reused by every later one (like the keeper's slots).

A staged state holds no reference to the live tensors, so training may go on changing them
while a background thread writes, fsyncs and commits the copy.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from checkpointing.layout import Saveable, ShardView, local_box


class HostBuffers:
    """Per-name host buffers; `stage` copies a logical state into them and returns views."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def stage(self, logical: dict[str, Saveable]) -> dict[str, Saveable]:
        """Copy every local shard into its buffer; DTensors come back as ShardViews (no mesh)."""
        staged: dict[str, Saveable] = {}
        buffers: dict[str, torch.Tensor] = {}
        on_gpu = False
        for name, value in logical.items():
            if isinstance(value, ShardView):
                local, offsets, shape = value.local, value.offsets, value.global_shape
            elif isinstance(value, DTensor):
                local, offsets, shape = local_box(value)
            else:
                local, offsets, shape = value, None, None
            buffers[name] = buf = self._buffer(name, local)
            copy_into(buf, local)
            on_gpu = on_gpu or local.is_cuda
            staged[name] = buf if offsets is None else ShardView(buf, tuple(offsets), tuple(shape))
        if on_gpu:
            torch.cuda.current_stream().synchronize()  # the async device-to-host copies landed
        self._buffers = buffers  # names gone from the state (growth) release their buffers
        return staged

    def _buffer(self, name: str, local: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != local.shape or buf.dtype != local.dtype:
            # Pinned host memory lets device-to-host copies run asynchronously at full speed.
            buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
        return buf


def copy_into(buf: torch.Tensor, local: torch.Tensor) -> None:
    with torch.no_grad():
        buf.copy_(local.detach(), non_blocking=local.is_cuda)
