"""The device mesh: one object that knows the parallel sizes and hands out named sub-meshes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    """World = dp × tp; ranks of one tensor-parallel group are adjacent (fastest link)."""

    world_size: int
    tp: int = 1
    strategy: str = "fsdp"
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        assert self.world_size % self.tp == 0, (self.world_size, self.tp)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def fsdp_enabled(self) -> bool:
        # One data-parallel rank has nothing to shard or reduce: skip the wrapper (torchtitan too).
        return self.strategy == "fsdp" and self.dp > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.strategy == "ddp" and self.dp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        self._mesh = init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        return self._mesh

    def __getitem__(self, name: str) -> DeviceMesh:
        assert self._mesh is not None, "call build_mesh first"
        return self._mesh[name]

    def dp_rank(self) -> int:
        return self["dp"].get_local_rank() if self._mesh is not None else 0


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"
