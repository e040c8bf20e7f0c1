"""The device mesh: one object that knows the parallel sizes and hands out named sub-meshes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    """World = pp × dp × tp, torchtitan's order: ranks of one tensor-parallel group are adjacent
    (fastest link), pipeline stages the outermost. With expert parallelism the dp ranks form a
    (dp_mod_ep, ep) grid and `dp` is their flattened mesh: each ep group of adjacent dp ranks
    holds every expert once."""

    world_size: int
    tp: int = 1
    strategy: str = "fsdp"
    ep: int = 1
    pp: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        assert self.world_size % (self.tp * self.pp) == 0, (self.world_size, self.tp, self.pp)
        assert self.dp % self.ep == 0, (self.dp, self.ep)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

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
        shape: list[tuple[str, int]] = [("pp", self.pp)] if self.pp_enabled else []
        if self.ep_enabled:
            shape += [("dp_mod_ep", self.dp // self.ep), ("ep", self.ep)]
        else:
            shape.append(("dp", self.dp))
        shape.append(("tp", self.tp))
        names, sizes = zip(*shape)
        self._mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        if self.ep_enabled:
            self._mesh["dp_mod_ep", "ep"]._flatten("dp")
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
