"""Model growth as checkpoint transforms: dense→MoE upcycling and layer stacking.

    upcycle(src, out, num_experts=8, top_k=2)             # universal checkpoint -> new one
    stack(src, out, method="gstack", factor=2)
    upcycle_tensors(tensors, model_config, num_experts=8, top_k=2)   # in memory (mid-run)

See trainer/growth/upcycle.py and stack.py for the methods and their exactness.
"""

from trainer.growth.stack import StackOptions, parse_layer_ranges
from trainer.growth.transforms import (
    Grown,
    grow_checkpoint,
    grow_tensors,
    stack,
    stack_tensors,
    upcycle,
    upcycle_tensors,
)
from trainer.growth.upcycle import UpcycleOptions

__all__ = [
    "Grown",
    "StackOptions",
    "UpcycleOptions",
    "grow_checkpoint",
    "grow_tensors",
    "parse_layer_ranges",
    "stack",
    "stack_tensors",
    "upcycle",
    "upcycle_tensors",
]
