"""DeepSpeed's own way to another world size, timed for the reshard benchmark: the MLP state of
scripts/bench_reshard.py trained one step under ZeRO-1 on 2 ranks and saved by DeepSpeed, then
`ds_to_universal` (the command a user runs) and `engine.load_checkpoint` with
`checkpoint.load_universal` into ZeRO-1 on 3 ranks.

    from scripts.bench_reshard_deepspeed import deepspeed_reshard_seconds
    convert_s, load_s = deepspeed_reshard_seconds(root, width, depth)

Both steps run as commands (torchrun for the engines); the load time is the slowest rank's
`load_checkpoint`, measured inside the engine's processes (start-up excluded, as for ours).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.bench_ds_import import ds_to_universal_seconds, run_timed  # noqa: E402

SAVE_RANKS, LOAD_RANKS = 2, 3


def _engine(width: int, depth: int, load_universal: bool):
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(depth)])
    config = {"train_batch_size": 2 * dist.get_world_size(),
              "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True,
              "checkpoint": {"load_universal": load_universal}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


def save_worker(root: str, width: int, depth: int) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    dist.init_process_group("gloo")
    engine = _engine(width, depth, load_universal=False)
    engine.backward(engine(torch.randn(2, width)).square().mean())
    engine.step()
    # ds_to_universal needs this entry for ZeRO-1/2 (no tensor-parallel patterns here).
    engine.save_checkpoint(root, client_state={UNIVERSAL_CHECKPOINT_INFO: {}})
    dist.barrier()
    dist.destroy_process_group()


def load_worker(root: str, width: int, depth: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    engine = _engine(width, depth, load_universal=True)
    dist.barrier()
    start = time.perf_counter()
    engine.load_checkpoint(root)  # the tag `latest_universal` names
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        Path(root, "load_seconds.json").write_text(json.dumps(elapsed.item()))
    dist.destroy_process_group()


def _torchrun(ranks: int, role: str, root: Path, width: int, depth: int) -> None:
    run_timed("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
         str(Path(__file__)), role, str(root), str(width), str(depth))


def deepspeed_reshard_seconds(root: Path, width: int, depth: int) -> tuple[float, float]:
    """(ds_to_universal wall time as a command, slowest rank's universal load) for 2 -> 3."""
    root = Path(root) / "deepspeed"
    _torchrun(SAVE_RANKS, "--save-worker", root, width, depth)
    step_dir = next(root.glob("global_step*"))
    convert = ds_to_universal_seconds(step_dir, Path(f"{step_dir}_universal"))
    _torchrun(LOAD_RANKS, "--load-worker", root, width, depth)
    return convert, json.loads((root / "load_seconds.json").read_text())


if __name__ == "__main__":
    from trainer.distributed import exit_skipping_teardown

    role, root, width, depth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"--save-worker": save_worker, "--load-worker": load_worker}[role](root, width, depth)
    exit_skipping_teardown(0)  # gloo threads can abort a normal interpreter exit
