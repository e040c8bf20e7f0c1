"""A worker's failure, written where torchrun looks for it (`TORCHELASTIC_ERROR_FILE`).

torchrun gives every worker an error file path and reads the file when the worker exits with a
failure (torch.distributed.elastic.multiprocessing.errors). A user error is written as its one
line; anything else as torch's own record (type, message and traceback, what `@record` writes).
The launcher (`perennial train`, launch/torchrun.py) turns the file of the first failed rank into
the one line the user sees; under a plain `torchrun` the file is the root cause in its report.
"""

from __future__ import annotations

import json
import os
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from trainer.args import one_line

ENV_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
             "DistBackendError", "DistNetworkError", "timed out", "Timed out", "NCCL")
"""Fragments of the errors a rank raises when another rank has gone (its collectives fail)."""
ENV_LAUNCHER_REPORTS = "PERENNIAL_LAUNCHER_REPORTS"
"""Set by launch/torchrun.py: the launcher prints each failure, the worker need not."""


def report_user_error(err: Exception) -> None:
    """One line to the error file (if any) and, unless the launcher reports it, to stderr."""
    message = one_line(err)
    path = os.environ.get(ENV_ERROR_FILE)
    if path:
        _write_atomically(path, {"message": message, "timestamp": int(time.time())})
    if not os.environ.get(ENV_LAUNCHER_REPORTS) and os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)


def record_crash(err: BaseException) -> bool:
    """An unexpected exception: torch's structured record, traceback included. True when the
    launcher will report it and it only follows a peer's failure (its traceback is noise)."""
    if os.environ.get(ENV_ERROR_FILE):
        ErrorHandler().record_exception(err)
    text = f"{type(err).__name__}: {err}"
    return bool(os.environ.get(ENV_LAUNCHER_REPORTS)) and any(f in text for f in PEER_LOST)


def _write_atomically(path: str, data: dict) -> None:
    # torchrun may read the file the moment this process exits; never half-written.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
