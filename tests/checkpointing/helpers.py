"""A tiny LM trained under several parallel layouts, and the rank functions the tests spawn.

Dimensions are deliberately not divisible by 2 or 3 so every shard is uneven.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from checkpointing import (
    CheckpointManager,
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
)

VOCAB, DIM, HIDDEN, BATCH, SEQ = 37, 13, 23, 6, 5
BLOCK_SIZE = 128  # tiny blocks so resharded reads cover partial boxes


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.norm(h))


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(layout: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """layout: plain (1 process), ddp, fsdp (FSDP2) or tp (tensor parallel over all ranks)."""
    torch.manual_seed(seed)
    model = TinyLM()
    _, world = _rank_world()
    if layout == "ddp":
        model = DistributedDataParallel(model)
    elif layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for sub in (model.embed, model.fc1, model.fc2, model.head):
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (world,))
        plan = {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()}
        parallelize_module(model, mesh, plan)  # fc1 keeps a DTensor: its 23 columns are uneven
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def train_step(model: nn.Module, optimizer, layout: str, step: int) -> float:
    """One step on the global batch of `step`; returns the global mean loss before the update."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    rank, world = _rank_world()
    data_parallel = layout in ("ddp", "fsdp")
    if data_parallel:
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        tokens, targets = tokens[rows], targets[rows]
    loss = F.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    total = loss.detach().clone()
    if data_parallel:
        dist.all_reduce(total)
        total /= world
    return total.item()


def all_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = model_tensors(model)
    optim, values = optimizer_tensors(model, optimizer)
    tensors.update(optim)
    return tensors, values


def consolidated(model, optimizer) -> dict[str, torch.Tensor]:
    tensors, _ = all_tensors(model, optimizer)
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in tensors.items()
    }


def save_case(root: Path, layout: str) -> None:
    """Train 2 steps under `layout`, save, record the consolidated state and 2 further losses."""
    model, optimizer = build(layout)
    for step in (1, 2):
        train_step(model, optimizer, layout, step)
    tensors, values = all_tensors(model, optimizer)
    rank, _ = _rank_world()
    mgr = CheckpointManager(root, keep=2, block_size=BLOCK_SIZE)
    mgr.save(2, tensors, {"optimizer": values, "layout": layout}, {"rank": rank})
    reference = consolidated(model, optimizer)
    losses = [train_step(model, optimizer, layout, step) for step in (3, 4)]
    if rank == 0:
        save_file(reference, str(root / "reference.safetensors"))
        (root / "losses.json").write_text(json.dumps(losses))


def load_case(root: Path, layout: str) -> list[float]:
    """Load `root` into a fresh `layout`, check the state exactly and the next losses closely."""
    model, optimizer = build(layout, seed=123)
    tensors, _ = all_tensors(model, optimizer)
    result = CheckpointManager(root, block_size=BLOCK_SIZE).load_latest(tensors)
    assert result is not None and result.step == 2 and not result.skipped, result
    apply_model_tensors(model, tensors)
    apply_optimizer_tensors(model, optimizer, tensors, result.global_state["optimizer"])
    reference = load_file(str(root / "reference.safetensors"))
    state = consolidated(model, optimizer)
    assert sorted(state) == sorted(reference), sorted(set(state) ^ set(reference))
    for name, value in reference.items():
        assert torch.equal(state[name], value), f"{name} differs after loading into {layout}"
    saved_world = len(result.rank_states)
    assert result.rank_states == [{"rank": r} for r in range(saved_world)]
    losses = [train_step(model, optimizer, layout, step) for step in (3, 4)]
    expected = json.loads((root / "losses.json").read_text())
    for got, want in zip(losses, expected):
        assert abs(got - want) < 1e-5, f"{root.name} -> {layout}: loss {got} != {want}"
    return losses


def run_cases(tmp: Path, cases: list[tuple[str, str, str]]) -> list:
    """Rank function: ("save" | "load", layout, checkpoint name) cases, in order."""
    results = []
    for action, layout, name in cases:
        if action == "save":
            save_case(tmp / name, layout)
        else:
            results.append(load_case(tmp / name, layout))
        if dist.is_initialized():
            dist.barrier()
    return results


def downgrade_to_format_v1(path: Path) -> None:
    """Rewrite checkpoint `path` as format version 1 wrote it: zlib crc32 blocks, no column
    tiles, no metadata checksums (to test that old checkpoints stay readable)."""
    index = json.loads((path / "index.json").read_text())
    block = index["block_size"]
    index.update(format_version=1, checksum="crc32")
    index.pop("metadata_crc32")
    for tensor in index["tensors"].values():
        for box in tensor["shards"]:
            data = (path / box["file"]).read_bytes()
            raw = data[box["byte_offset"] : box["byte_offset"] + box["byte_length"]]
            box.pop("tiles", None)
            box["block_crc32"] = [zlib.crc32(raw[i : i + block]) for i in range(0, len(raw), block)]
    (path / "index.json").write_text(json.dumps(index))
    state = json.loads((path / "state.json").read_text())
    state.pop("metadata_crc32")
    state["format_version"] = 1
    (path / "state.json").write_text(json.dumps(state))
