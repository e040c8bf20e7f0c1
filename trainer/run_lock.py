"""One run per run directory: an exclusive lock on `<run.dir>/run.lock` naming its holder.

`perennial train` takes it (on node 0) for the whole job and tells its workers so; a bare
`torchrun -m trainer` takes it in rank 0. The lock is `flock(2)`: the kernel drops it when the
holder dies, however it dies, so a lock file that still names a holder but can be locked is
stale (that run was killed) and is taken over.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"
ENV_LOCK_HELD = "PERENNIAL_RUN_LOCK_HELD"
"""Set by the launcher to the run directory it holds the lock of; its workers do not lock."""
ENV_FRESH = "PERENNIAL_FRESH"
"""`perennial train --fresh`: state the run finds but cannot use is set aside, not a stop."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.stale_holder: str | None = None
        """The holder a killed run left in the lock file, when this lock took it over."""

    def acquire(self) -> RunLock:
        """Take the lock, or raise ValueError naming the run that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "a process that has not written its name yet"
            os.close(fd)
            raise ValueError(f"run.dir {self.run_dir} is in use by another run ({holder}); "
                             "wait for it to end, stop it, or choose another run.dir") from None
        self.stale_holder = _read(fd) or None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        holder = f"host {socket.gethostname()} pid {os.getpid()} started {started}"
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Clear the holder (a clean end leaves no stale lock) and unlock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # a full or vanished disk must not hide the run's own result
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def lock_unless_held(run_dir: str | os.PathLike, is_rank0: bool) -> RunLock | None:
    """In a worker: rank 0 locks the run directory unless its launcher already holds it."""
    if not is_rank0 or os.environ.get(ENV_LOCK_HELD) == str(Path(run_dir).resolve()):
        return None
    lock = RunLock(run_dir).acquire()
    if lock.stale_holder:
        print(f"taking over the stale lock of run.dir {run_dir} ({lock.stale_holder}, no "
              "longer running)", flush=True)
    return lock
