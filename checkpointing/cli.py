"""`ckpt` command line: inspect, verify and export checkpoints.

    ckpt inspect PATH [--json]
    ckpt verify PATH
    ckpt export PATH OUT --format safetensors

PATH is a checkpoint directory, a checkpoint root or a run directory (its newest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpointing.commit import resolve_checkpoint
from checkpointing.format import CheckpointDamaged
from checkpointing.inspect import describe, export_safetensors, format_description, verify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt", description="Inspect Perennial checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show step, layout and tensors")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    check = commands.add_parser("verify", help="check every shard and checksum")
    check.add_argument("path")
    export = commands.add_parser("export", help="write consolidated model weights")
    export.add_argument("path")
    export.add_argument("out")
    export.add_argument("--format", choices=["safetensors"], default="safetensors")
    return parser


def main(argv: list[str]) -> int:
    """Run one `ckpt` command; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage problem
        return int(exit_.code or 0)
    try:
        checkpoint = resolve_checkpoint(args.path)
        if args.command == "inspect":
            info = describe(checkpoint)
            print(json.dumps(info, indent=1) if args.json else format_description(info))
            return 0
        if args.command == "verify":
            return _verify(checkpoint)
        count = export_safetensors(checkpoint, Path(args.out))
        print(f"exported {count} tensors from {checkpoint} to {args.out}")
        return 0
    except BrokenPipeError:  # `ckpt inspect ... | head`: the reader has gone; so do we
        raise
    except (ValueError, CheckpointDamaged, OSError) as err:
        print(f"ckpt {args.command}: error: {err}", file=sys.stderr)
        return 2


def _verify(checkpoint: Path) -> int:
    report = verify(checkpoint)
    if report.damage:
        print(f"BAD {checkpoint}:")
        print("\n".join(report.summary()))
        return 1
    print(f"OK {checkpoint}: index.json, state.json, {report.files} shard file(s) and "
          f"{report.boxes} tensor shard(s) match their checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
