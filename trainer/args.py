"""Command-line parsing shared by every `perennial` command and the worker (`python -m
trainer`): an optional config path first, then flags and `key=value` overrides in any order."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field


class UsageError(ValueError):
    """A malformed command line; reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2 itself
        raise UsageError(f"{self.prog}: {message}")


def one_line(err: Exception) -> str:
    """User errors are reported on one line, whatever the message's own layout."""
    return " ".join(str(err).split())


@dataclass
class JobArgs:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    flags: argparse.Namespace = field(default_factory=argparse.Namespace)


def parse_job_args(
    argv: list[str], prog: str, add_flags: Callable[[argparse.ArgumentParser], None] | None = None
) -> JobArgs:
    parser = Parser(prog=prog, add_help=True)
    if add_flags is not None:
        add_flags(parser)
    flags, rest = parser.parse_known_args(argv)
    args = JobArgs(flags=flags)
    for token in rest:
        if token.startswith("-"):
            raise UsageError(f"{prog}: unknown flag {token}")
        if "=" in token:
            args.overrides.append(token)
        elif args.config is None and not args.overrides:
            args.config = token
        else:
            raise UsageError(f"{prog}: unexpected argument {token!r} (overrides are key=value)")
    return args
