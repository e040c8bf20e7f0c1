"""Processes that die with their owner: the keeper and torchrun with `perennial train`, the
workers with torchrun (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere nothing is set).

A killed launcher would otherwise leave torchrun and its workers training to the end and the
keeper holding shared memory; workers in their own sessions escape a process-group kill.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits. If the parent is
    already gone (`parent_pid` given and no longer our parent), act at once."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # not permitted in this sandbox: the owner's own cleanup still runs
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def preexec_die_with(parent_pid: int, sig: int):
    """A `subprocess.Popen(preexec_fn=...)` that makes the child die with `parent_pid`; the
    setting survives exec, so it also holds for the program the child runs."""
    return lambda: die_with_parent(sig, parent_pid)


def die_with_torchrun() -> None:
    """In a worker started by torchrun: die when the torchrun agent does. A worker is slow to
    get here (imports), so torchrun may already be gone: then the parent is no torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    die_with_parent(signal.SIGKILL)
    if not _is_torchrun(os.getppid()):
        print(f"worker {os.getpid()}: torchrun is gone; exiting", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _is_torchrun(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid != 1 and b"torch" in f.read()
    except OSError:
        return pid != 1  # no /proc: trust anything but init
