"""Universal, sharded, pickle-free checkpoints for any PyTorch training loop.

    mgr = CheckpointManager(root_dir, keep=3)
    mgr.save(step, tensors, global_state, rank_state)   # blocking=False: copy now, write behind
    result = mgr.load_latest(tensors)   # fills tensors in place, in any parallel layout

See docs/checkpoint-format.md. This package never imports the trainer.
"""

from checkpointing.cadence import SaveCadence
from checkpointing.commit import Candidate, find_loadable, resolve_checkpoint
from checkpointing.format import CheckpointDamaged
from checkpointing.layout import Fused, Padded, Stacked
from checkpointing.manager import CheckpointManager, LoadResult
from checkpointing.model_state import (
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
)

__all__ = [
    "Candidate",
    "CheckpointDamaged",
    "CheckpointManager",
    "Fused",
    "LoadResult",
    "Padded",
    "SaveCadence",
    "Stacked",
    "apply_model_tensors",
    "apply_optimizer_tensors",
    "find_loadable",
    "model_tensors",
    "optimizer_tensors",
    "resolve_checkpoint",
]
