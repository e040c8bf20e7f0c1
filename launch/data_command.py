"""`perennial data prepare SOURCE OUT --tokenizer T` and `perennial data verify OUT`."""

from __future__ import annotations

import argparse
import sys

from trainer.args import Parser, UsageError
from trainer.data.prepare import DEFAULT_SHARD_TOKENS, prepare
from trainer.data.shards import verify_shards

USAGE = (
    "perennial data {prepare SOURCE OUT --tokenizer T [--num-proc N] [--text-column C], "
    "verify OUT}"
)


def _prepare_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="perennial data prepare")
    parser.add_argument("source",
                        help="file, directory, save_to_disk directory or hf:NAME[:CONFIG]")
    parser.add_argument("out", help="directory for the token shards and manifest.json")
    parser.add_argument("--tokenizer", required=True,
                        help="'bytes' or a local Hugging Face tokenizer directory (data.tokenizer)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenising processes")
    parser.add_argument("--text-column", default="text", help="column holding the text")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard file (cut at the next document boundary)")
    return parser


def data_command(argv: list[str]) -> int:
    if not argv or argv[0] not in ("prepare", "verify"):
        raise UsageError(f"usage: {USAGE}")
    if argv[0] == "verify":
        if len(argv) != 2:
            raise UsageError("usage: perennial data verify OUT")
        problems = verify_shards(argv[1])
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{argv[1]}: {'intact' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    args = _prepare_parser().parse_args(argv[1:])
    manifest = prepare(args.source, args.out, args.tokenizer, args.num_proc, args.text_column,
                       args.shard_tokens, say=lambda message: print(message, flush=True))
    print(f"use it as data.sources[].path={args.out} with data.tokenizer="
          f"{manifest['tokenizer']['spec']}")
    return 0
