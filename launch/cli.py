"""The `perennial` console script."""

from __future__ import annotations

import importlib
import os
import sys

from trainer.args import UsageError, one_line

USAGE = """usage: perennial COMMAND ...   (COMMAND --help: its flags)

commands:
  train [CONFIG] [key=value ...] [--nproc N] [--max-restarts K] [--dry-run] [--verbose]
  config [CONFIG] [key=value ...]   every config key: its value, default and meaning
  ckpt {inspect,verify,export,import} PATH ...
  grow {upcycle,stack} SRC OUT ...
  schedule [CONFIG] [key=value ...] [--plot OUT.png]
  slurm [CONFIG] [key=value ...] --nodes N --gpus-per-node G [--submit]
  clean RUN_DIR    free the memory snapshots a killed run left in /dev/shm
"""
COMMANDS = {
    "train": ("launch.train_command", "train_command"),
    "config": ("launch.config_command", "config_command"),
    "ckpt": ("launch.ckpt_command", "ckpt_command"),
    "grow": ("launch.grow_command", "grow_command"),
    "schedule": ("launch.schedule_command", "schedule_command"),
    "slurm": ("launch.slurm", "slurm_command"),
    "clean": ("launch.clean_command", "clean_command"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        return _dispatch(command, rest)
    except (UsageError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `perennial ckpt inspect ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(command: str, rest: list[str]) -> int:
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    module, function = COMMANDS[command]  # imported on use: each command's imports are heavy
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
