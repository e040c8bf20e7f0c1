"""`perennial schedule`: print or plot a config's LR curve without training."""

from __future__ import annotations

import argparse

from trainer.args import parse_job_args
from trainer.config_loader import load_config
from trainer.schedule import build_schedule, describe_schedule, plot_schedule


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", metavar="OUT.png", help="write the LR curve as a PNG")
    parser.add_argument("--every", type=int, default=0, help="print the LR every N steps")


def schedule_command(argv: list[str]) -> int:
    args = parse_job_args(argv, prog="perennial schedule", add_flags=_add_flags)
    cfg = load_config(args.config, args.overrides)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    schedule = build_schedule(cfg.schedule, cfg.optim.lr, tokens_per_step)
    print(describe_schedule(cfg.schedule, cfg.optim.lr))
    total = cfg.schedule.total_steps
    every = args.flags.every or max(1, total // 10)
    for step in [*range(0, total, every), total]:
        print(f"  step {step:>7}  lr {schedule.lr(step):.4e}")
    if args.flags.plot:
        plot_schedule({cfg.schedule.name: schedule}, args.flags.plot, title=cfg.run.name)
        print(f"wrote {args.flags.plot}")
    return 0
