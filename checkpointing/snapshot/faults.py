"""Fault-injection points for the fault-injection tests (like NVIDIA's resiliency injector).

`PERENNIAL_FAULT_PAUSE=<point>[@<step>][#<rank>]:<action>:<marker>[;...]` acts the first time
`<point>` ("copy", "persist", "step") is reached in any process (or in rank `<rank>`), at step
`<step>` or later (the `<marker>` file records it). `<action>` is a number of seconds to pause,
printing a line that names the point and the pid so a test can SIGKILL that process right
there, or `kill`: the process SIGKILLs itself there (no race with the test's reaction time).
`PERENNIAL_KEEPER_MAX_FILE_BYTES=<n>` caps the file size (RLIMIT_FSIZE) while the keeper
persists: writes past it fail with EFBIG like a full disk. Unset, both do nothing.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import time


def maybe_pause(point: str, step: int, what: str, rank: int | None = None) -> None:
    for spec in filter(None, os.environ.get("PERENNIAL_FAULT_PAUSE", "").split(";")):
        where, _, rest = spec.partition(":")
        action, _, marker = rest.partition(":")
        where, _, only_rank = where.partition("#")
        name, _, from_step = where.partition("@")
        if only_rank and rank != int(only_rank):
            continue
        if name == point and marker and step >= int(from_step or 0) and _first(marker):
            _act(point, what, action)


def _first(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _act(point: str, what: str, action: str) -> None:
    verb = "killed itself" if action == "kill" else "paused"
    print(f"fault-injection: {verb} in {point} ({what}) pid {os.getpid()}", file=sys.stderr,
          flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(action or 10))


def install_in_keeper() -> None:
    """From the keeper's main thread (signal handlers can be set nowhere else)."""
    if os.environ.get("PERENNIAL_KEEPER_MAX_FILE_BYTES"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed


@contextlib.contextmanager
def persist_file_size_limit():
    limit = os.environ.get("PERENNIAL_KEEPER_MAX_FILE_BYTES")
    if not limit:
        yield
        return
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
