"""Data pipeline: built-in corpora, tokenizers, token shards and the global sample stream.

`data = build_data(cfg.data, seed, global_batch_size, micro_batch_size)`, then once per step
`for inputs, targets in data.next_step_batches(dp_rank, dp_size): ...` on every rank.

Names are imported on first use, so that `perennial data prepare`'s tokenising processes,
which import trainer.data.prepare, do not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "pipeline",
    "Data": "pipeline",
    "build_data": "pipeline",
    "DataConfig": "config",
    "SourceConfig": "config",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.data.{_EXPORTS[name]}"), name)
