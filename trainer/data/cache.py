"""Files shared by concurrent ranks: build once under a lock, publish atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator

from filelock import FileLock


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers therefore see either no file or a complete one, whoever wins a race.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; caches may be shared between users
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish(tmp: str, path: str) -> None:
    """Make the complete file `tmp` durable, then rename it onto `path` (and make that durable):
    after a crash `path` is either absent, its old version, or complete."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json_atomic(path: str, obj: object) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, sort_keys=True)


def build_once(path: str, build: Callable[[str], None]) -> str:
    """Return `path`, first calling `build(tmp_path)` if no complete file exists yet.

    A lock file makes concurrent ranks wait for one builder instead of all building; the atomic
    rename keeps the result correct even where locks do not work (some network file systems).
    """
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            with atomic_output(path) as tmp:
                build(tmp)
    return path


def stable_hash(obj: object, length: int = 16) -> str:
    """Hex digest of a JSON-able object, identical across processes and machines."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:length]
