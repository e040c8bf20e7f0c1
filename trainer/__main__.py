"""Worker entry point: `python -m trainer [CONFIG] [key=value ...]`.

This is what `perennial train --nproc N` runs under torchrun, and what users put under their
own `torchrun` or `srun`.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from launch.args import one_line, parse_job_args
from trainer.config_loader import load_config, validate_layout
from trainer.distributed import exit_skipping_teardown
from trainer.lifetime import die_with_torchrun
from trainer.run_lock import lock_unless_held


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(argv if argv is not None else sys.argv[1:], prog="python -m trainer")
    try:
        cfg = load_config(args.config, args.overrides)
        validate_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    from trainer.train import Trainer

    lock = None
    try:
        lock = lock_unless_held(cfg.run.dir, is_rank0=os.environ.get("RANK", "0") == "0")
        Trainer(cfg).train()
        if dist.is_initialized():
            dist.barrier()  # no rank tears down its connections while a peer still uses them
    except ValueError as err:  # user errors found while building (data files, checkpoints)
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    die_with_torchrun()
    try:
        exit_code = main()
    except SystemExit as stop:  # preemption: state saved, exit 143 for a requeue
        exit_code = stop.code if isinstance(stop.code, int) else 1
    exit_skipping_teardown(exit_code)
