"""Worker entry point: `python -m trainer [CONFIG] [key=value ...]`.

This is what `perennial train --nproc N` runs under torchrun, and what users put under their
own `torchrun` or `srun`. A failure is written to torchrun's error file (trainer/errors.py).
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from trainer.args import parse_job_args
from trainer.config_loader import load_config, validate_layout
from trainer.distributed import exit_skipping_teardown
from trainer.errors import record_crash, report_user_error
from trainer.lifetime import die_with_torchrun
from trainer.run_lock import lock_unless_held


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv if argv is not None else sys.argv[1:])
    except ValueError as err:  # user errors: config, data files, checkpoints
        report_user_error(err)
        return 2
    except SystemExit:  # preemption: state saved, exit 143 for a requeue
        raise
    except BaseException as err:
        if record_crash(err):  # a peer failed first; the launcher names it
            return 1
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(argv: list[str]) -> int:
    args = parse_job_args(argv, prog="python -m trainer")
    cfg = load_config(args.config, args.overrides)
    validate_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    from trainer.train import Trainer

    lock = lock_unless_held(cfg.run.dir, is_rank0=os.environ.get("RANK", "0") == "0")
    try:
        Trainer(cfg).train()
        if dist.is_initialized():
            dist.barrier()  # no rank tears down its connections while a peer still uses them
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    die_with_torchrun()
    try:
        exit_code = main()
    except SystemExit as stop:
        exit_code = stop.code if isinstance(stop.code, int) else 1
    exit_skipping_teardown(exit_code)
