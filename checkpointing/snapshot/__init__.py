"""The memory tier: asynchronous snapshots into shared memory held by a per-node keeper.

A snapshot slot is laid out like an on-disk shard (safetensors + boxes), so restoring from
memory and persisting to disk reuse the universal checkpoint format. See docs/architecture.md.
"""

from checkpointing.snapshot.engine import SnapshotEngine
from checkpointing.snapshot.restore import MemoryRestore

__all__ = ["MemoryRestore", "SnapshotEngine"]
