"""`perennial ckpt`: import foreign checkpoints, export Hugging Face directories.

    perennial ckpt import SRC OUT                 SRC: a Hugging Face model directory, a
                                                  DeepSpeed ZeRO checkpoint or ds_to_universal
                                                  dir, or a torch DCP checkpoint (torchtitan)
    perennial ckpt export PATH OUT --format hf [--max-shard-size 5GB] [--dtype float32]

One parser describes every subcommand (so `--help` shows them all); inspect, verify and export
--format safetensors then run as checkpointing.cli's.
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
from checkpointing.torch_dcp import import_dcp_checkpoint, is_dcp_dir
from trainer.args import Parser

SourceKind = Literal["hf", "deepspeed", "dcp", "perennial"]
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> Parser:
    """Every `perennial ckpt` subcommand, so `--help` lists them all with all their flags."""
    from trainer.model.hf_export import DEFAULT_MAX_SHARD_SIZE

    parser = Parser(prog="perennial ckpt", description="Inspect, verify, export and import "
                    "checkpoints. PATH: a checkpoint dir, checkpoint root or run dir.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show step, layout and tensors")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("verify", help="check every shard and checksum").add_argument("path")
    export = commands.add_parser("export", help="write the model as one safetensors file or a "
                                 "Hugging Face directory")
    export.add_argument("path", help="checkpoint dir, checkpoint root or run dir")
    export.add_argument("out", help="file (safetensors) or directory (hf) to write; must not "
                        "exist (an empty directory is fine for hf)")
    export.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    export.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="hf only")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32",
                        help="hf only")
    imp = commands.add_parser("import",
                              help="import a Hugging Face, DeepSpeed or torch DCP checkpoint")
    imp.add_argument("src", help="a Hugging Face model dir, DeepSpeed checkpoint, "
                     "ds_to_universal dir or torch DCP checkpoint (torchtitan)")
    imp.add_argument("out", help="checkpoint root to create (must not exist or be empty)")
    return parser


def ckpt_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "import":
        return _import(args)
    if args.command == "export" and args.format == "hf":
        return _export_hf(args)
    if args.command == "export" and Path(args.out).exists():
        raise ValueError(f"{args.out} already exists; remove it or choose another file")
    return checkpointing_main(argv)


def detect_source_kind(path: str | os.PathLike) -> SourceKind:
    """What kind of checkpoint `path` is; ValueError (one line) when it is none we know."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if _is_deepspeed_dir(path):  # first: the HF check imports the model code (seconds)
        return "deepspeed"
    if is_dcp_dir(path):
        return "dcp"
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
    "hf": _import_hf, "deepspeed": _import_deepspeed, "dcp": import_dcp_checkpoint,
}


def _import(args) -> int:
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


def _export_hf(args) -> int:
    from trainer.model.hf_export import export_hf

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
