"""Data pipeline: built-in corpora, tokenizers, packed token caches and the global sample stream.

`data = build_data(cfg.data, seed, global_batch_size, micro_batch_size)`, then once per step
`for inputs, targets in data.next_step_batches(dp_rank, dp_size): ...` on every rank.
"""

from trainer.data.config import DataConfig, SourceConfig
from trainer.data.pipeline import IGNORE_INDEX, Data, build_data
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "Data",
    "DataConfig",
    "HFTokenizer",
    "SourceConfig",
    "build_data",
    "build_tokenizer",
]
