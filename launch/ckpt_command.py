"""`perennial ckpt`: import foreign checkpoints, export Hugging Face directories.

    perennial ckpt import SRC OUT                 SRC: a Hugging Face model directory, a
                                                  DeepSpeed ZeRO checkpoint or ds_to_universal dir
    perennial ckpt export PATH OUT --format hf [--max-shard-size 5GB] [--dtype float32]

Every other subcommand (inspect, verify, export --format safetensors) is checkpointing.cli's.
User errors raise ValueError; `launch/cli.py` prints them on one line and exits non-zero.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from checkpointing import resolve_checkpoint
from checkpointing.cli import main as checkpointing_main
from checkpointing.deepspeed.files import is_universal_dir
from trainer.args import Parser

SourceKind = Literal["hf", "deepspeed", "perennial"]
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ckpt_command(argv: list[str]) -> int:
    if argv[:1] == ["import"]:
        return _import(argv[1:])
    if argv[:1] == ["export"] and _wants_hf(argv[1:]):
        return _export_hf(argv[1:])
    return checkpointing_main(argv)


def _wants_hf(argv: list[str]) -> bool:
    return "--format=hf" in argv or any(
        a == "--format" and b == "hf" for a, b in zip(argv, argv[1:])
    )


def detect_source_kind(path: str | os.PathLike) -> SourceKind:
    """What kind of checkpoint `path` is; ValueError (one line) when it is none we know."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if _is_deepspeed_dir(path):  # first: the HF check imports the model code (seconds)
        return "deepspeed"
    from trainer.model.hf_io import CONFIG_FILE, is_hf_dir

    if is_hf_dir(path):
        return "hf"
    try:
        resolve_checkpoint(path)
        return "perennial"
    except ValueError:
        pass
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path / CONFIG_FILE} is missing: not a Hugging Face model directory")
    raise ValueError(f"{path} has {CONFIG_FILE} but no model weights (model.safetensors, ...)")


def _is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed save dir (`global_stepN/` with *_model_states.pt), one such step dir, or a
    ds_to_universal output dir (`zero/<param>/fp32.pt`)."""
    if is_universal_dir(path):
        return True
    step_dirs = [path, *path.glob("global_step*")]
    return any(any(d.glob("*model_states.pt")) for d in step_dirs if d.is_dir())


def _import_hf(src: Path, out: Path) -> Path:
    from trainer.model.hf_io import import_hf_checkpoint

    return import_hf_checkpoint(src, out)


def _import_deepspeed(src: Path, out: Path) -> Path:
    from checkpointing.deepspeed.importer import import_deepspeed_checkpoint

    return import_deepspeed_checkpoint(src, out)


# Importers by source kind.
IMPORTERS: dict[str, Callable[[Path, Path], Path]] = {
    "hf": _import_hf, "deepspeed": _import_deepspeed,
}


def _import(argv: list[str]) -> int:
    parser = Parser(prog="perennial ckpt import", description="Import a foreign checkpoint.")
    parser.add_argument("src", help="a Hugging Face model dir, DeepSpeed checkpoint or "
                        "ds_to_universal dir")
    parser.add_argument("out", help="checkpoint root to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    kind = detect_source_kind(src)
    if kind == "perennial":
        raise ValueError(f"{src} is already a Perennial checkpoint; nothing to import")
    if kind not in IMPORTERS:
        raise ValueError(f"importing {kind} checkpoints ({src}) is not supported yet")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory")
    checkpoint = IMPORTERS[kind](src, out)
    print(f"imported {kind} model {src} as {checkpoint}")
    return 0


def _export_hf(argv: list[str]) -> int:
    from trainer.model.hf_export import DEFAULT_MAX_SHARD_SIZE, export_hf

    parser = Parser(prog="perennial ckpt export", description="Export a Hugging Face model.")
    parser.add_argument("path", help="checkpoint dir, checkpoint root or run dir")
    parser.add_argument("out", help="directory to write (must not exist or be empty)")
    parser.add_argument("--format", choices=["hf"], required=True)
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32")
    args = parser.parse_args(argv)
    report = export_hf(args.path, args.out, args.max_shard_size, EXPORT_DTYPES[args.dtype])
    files = ", ".join(report.weight_files)
    print(f"exported {report.checkpoint} to {report.out} as Hugging Face {args.dtype}: {files}")
    if report.tokenizer_files:
        print(f"tokenizer files: {', '.join(report.tokenizer_files)}")
    for note in report.notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(ckpt_command(sys.argv[1:]))
