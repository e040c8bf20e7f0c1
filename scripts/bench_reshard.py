"""Reshard-load benchmark: load one saved training state (weights + AdamW moments) into the
same layout and into other layouts, with Perennial's loader and with torch DCP's, in one run.

    python scripts/bench_reshard.py                 # ~1 GB of state, writes docs/benchmarks.md
    python scripts/bench_reshard.py --quick --out -  # ~50 MB, prints the report only

The state is saved once by 2 ranks under FSDP2, by both tools, then loaded (page cache warm for
both) under: FSDP2 on 2 ranks (same layout), tensor parallel on 2 ranks (another layout, same
bytes per rank), FSDP2 on 3 ranks and 1 plain rank. Load time is the slowest rank's wall time.
Beside it, DeepSpeed's own route from 2 to 3 ranks: ds_to_universal, then a universal load.
Target (issue 3): cross-layout load within 1.2x of same-layout load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpointing import CheckpointManager, model_tensors, optimizer_tensors  # noqa: E402
from scripts.bench_reshard_deepspeed import deepspeed_reshard_seconds  # noqa: E402
from scripts.report import emit, fmt_seconds, machine_facts, median_spread, verdict  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def build_state(width: int, depth: int, layout: str):
    """An MLP stack (odd width: shards are uneven) with AdamW state, in the given layout."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    world = dist.get_world_size()
    if layout == "tp":
        mesh = init_device_mesh("cpu", (world,))
        plan = {
            str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(depth)
        }
        parallelize_module(model, mesh, plan)
    elif layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tensors = model_tensors(model)
    tensors.update(optimizer_tensors(model, optim)[0])
    return tensors


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def save_both(root: str, width: int, depth: int) -> int:
    tensors = build_state(width, depth, "fsdp")
    with torch.no_grad():
        for value in tensors.values():
            if value.is_floating_point() and value.dim() > 0:
                value.normal_()
    CheckpointManager(Path(root) / "ours", keep=1).save(1, tensors)
    dcp.save(tensors, checkpoint_id=str(Path(root) / "dcp"))
    local = sum(
        t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors.values()
    )
    total = torch.tensor(local, dtype=torch.int64)
    dist.all_reduce(total)
    return total.item()


def load_both(root: str, width: int, depth: int, layout: str, repeats: int) -> dict:
    tensors = build_state(width, depth, layout)
    manager = CheckpointManager(Path(root) / "ours", keep=1)
    ours_path = Path(root) / "ours" / "step-00000001"
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: manager.load(ours_path, tensors)))
        theirs.append(timed(lambda: dcp.load(tensors, checkpoint_id=str(Path(root) / "dcp"))))
    return {"ours": ours, "dcp": theirs}


SCENARIOS = [  # (label, world size, layout)
    ("same layout: FSDP2, 2 ranks", 2, "fsdp"),
    ("other layout: TP, 2 ranks", 2, "tp"),
    ("other world size: FSDP2, 3 ranks", 3, "fsdp"),
    ("consolidate: 1 plain rank", 1, "plain"),
]


def run(width: int, depth: int, repeats: int) -> tuple[int, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-reshard-") as root:
        nbytes = run_distributed(save_both, 2, args=(root, width, depth))[0]
        results = {}
        for label, world, layout in SCENARIOS:
            results[label] = run_distributed(
                load_both, world, args=(root, width, depth, layout, repeats)
            )[0]
            print(
                f"{label}: ours {fmt_seconds(results[label]['ours'])} s, "
                f"DCP {fmt_seconds(results[label]['dcp'])} s",
                flush=True,
            )
        results["deepspeed"] = deepspeed_reshard_seconds(Path(root), width, depth)
    return nbytes, results


def report(nbytes: int, results: dict, repeats: int) -> str:
    same = median_spread(results[SCENARIOS[0][0]]["ours"])[0]
    cross = median_spread(results[SCENARIOS[1][0]]["ours"])[0]
    lines = [
        "## Reshard load (`scripts/bench_reshard.py`)",
        "",
        f"Machine: {machine_facts()}. State: {nbytes / 2**30:.2f} GiB (fp32 weights + AdamW "
        f"moments), saved by 2 FSDP2 ranks; page cache warm; median ± half-range of {repeats} "
        "loads; time of the slowest rank. Perennial verifies a crc32 per 4 MiB block of every "
        "byte it reads; DCP verifies nothing.",
        "",
        "| load into | Perennial (s) | torch DCP (s) | Perennial / DCP |",
        "|---|---|---|---|",
    ]
    for label, _, _ in SCENARIOS:
        ours, theirs = results[label]["ours"], results[label]["dcp"]
        ratio = median_spread(ours)[0] / median_spread(theirs)[0]
        lines.append(f"| {label} | {fmt_seconds(ours)} | {fmt_seconds(theirs)} | {ratio:.2f}x |")
    other_world = median_spread(results[SCENARIOS[2][0]]["ours"])[0]
    lines += deepspeed_lines(results["deepspeed"], other_world)
    lines += [
        "",
        f"Target: cross-layout load ≤ 1.2x same-layout load. Measured: TP-2 / FSDP2-2 = "
        f"{cross / same:.2f}x ({verdict(cross / same <= 1.2)}).",
    ]
    return "\n".join(lines)


def deepspeed_lines(deepspeed: tuple[float, float], ours_2_to_3: float) -> list[str]:
    convert, load = deepspeed
    return [
        "",
        "DeepSpeed's way to another world size, on the same MLP state (one sample): ZeRO-1 "
        "saved by 2 ranks, `ds_to_universal` (as a command, 2 + 2 workers), then "
        "`load_checkpoint` with `load_universal` into ZeRO-1 on 3 ranks (slowest rank).",
        "",
        "| 2 ranks -> 3 ranks | time (s) |",
        "|---|---|",
        f"| DeepSpeed `ds_to_universal` | {convert:.3f} |",
        f"| DeepSpeed universal `load_checkpoint` | {load:.3f} |",
        f"| DeepSpeed total | {convert + load:.3f} |",
        f"| Perennial load, FSDP2 3 ranks (no conversion step) | {ours_2_to_3:.3f} |",
        "",
        f"DeepSpeed total / Perennial: {(convert + load) / ours_2_to_3:.1f}x.",
    ]


def markdown(quick: bool, repeats: int = 5) -> str:
    """The report section; `quick`: ~50 MB of state and 2 repeats instead of ~1 GB."""
    # width is odd so no layout splits it evenly; 3 tensors (weight + 2 moments) per parameter
    width, depth = (1001, 4) if quick else (2999, 10)
    repeats = 2 if quick else repeats
    nbytes, results = run(width, depth, repeats)
    return report(nbytes, results, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~50 MB of state, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks.md", help="report file, or - to print")
    args = parser.parse_args()
    text = markdown(args.quick, args.repeats)
    emit("reshard", text, args.out)


if __name__ == "__main__":
    main()
