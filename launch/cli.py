"""The `perennial` console script."""

from __future__ import annotations

import sys

from launch.args import UsageError, one_line

USAGE = """usage: perennial COMMAND ...

commands:
  train [CONFIG] [key=value ...] [--nproc N] [--max-restarts K] [--dry-run]
  ckpt {inspect,verify,export} PATH ...
  schedule [CONFIG] [key=value ...] [--plot OUT.png]
  data prepare SOURCE OUT --tokenizer T [--num-proc N] [--text-column C]
  data verify OUT
  slurm [CONFIG] [key=value ...] --nodes N --gpus-per-node G [--submit]
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from launch.train_command import train_command

            return train_command(rest)
        if command == "ckpt":
            from launch.ckpt_command import ckpt_command as ckpt_main

            return ckpt_main(rest)
        if command == "schedule":
            from launch.schedule_command import schedule_command

            return schedule_command(rest)
        if command == "slurm":
            from launch.slurm import slurm_command

            return slurm_command(rest)
        if command == "data":
            from launch.data_command import data_command

            return data_command(rest)
        if command == "grow":
            from launch.grow_command import grow_command

            return grow_command(rest)
    except (UsageError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"error: unknown command {command!r} (commands: train, ckpt, schedule)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
