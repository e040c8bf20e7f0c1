"""Small collectives on strings, built on tensors so that nothing is pickled."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _device(group: dist.ProcessGroup | None) -> torch.device:
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_strings(text: str, group: dist.ProcessGroup | None) -> list[str]:
    if not is_distributed(group):
        return [text]
    device = _device(group)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size(group))]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded, group=group)
    return [
        bytes(g[: int(n.item())].cpu().tolist()).decode("utf-8") for g, n in zip(gathered, lengths)
    ]


def broadcast_string(text: str, group: dist.ProcessGroup | None) -> str:
    """Rank 0's `text` on every rank."""
    return all_gather_strings(text, group)[0]


def agree_on_problem(problem: str | None, group: dist.ProcessGroup | None) -> str | None:
    """None when no rank has a problem; else every rank's problems, joined, on every rank."""
    if not is_distributed(group):
        return problem
    flag = torch.tensor([1 if problem else 0], dtype=torch.int32, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return None
    problems = all_gather_strings(problem or "", group)
    unique: dict[str, list[int]] = {}
    for r, text in enumerate(problems):
        if text:
            unique.setdefault(text, []).append(r)
    return "; ".join(f"{text} (rank {','.join(map(str, ranks))})" for text, ranks in unique.items())


def barrier(group: dist.ProcessGroup | None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)
