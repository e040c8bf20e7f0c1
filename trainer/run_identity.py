"""A run directory's identity: one id per training run, created with the directory.

The id ties everything a run leaves outside its directory to that run: its memory snapshots
(a recreated directory is a new run and never adopts the old one's memory) and its W&B run
(one W&B run per training run, resumed across restarts and requeues).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

RUN_ID_FILE = "run_id"


def read_run_id(run_dir: str | os.PathLike) -> str | None:
    """The run's id, or None when the directory has none yet."""
    try:
        text = (Path(run_dir) / RUN_ID_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not text or not text.isalnum():
        raise ValueError(f"{Path(run_dir) / RUN_ID_FILE}: not a run id ({text[:40]!r})")
    return text


def ensure_run_id(run_dir: str | os.PathLike) -> str:
    """The run's id, created if the directory has none. Safe to call from every rank and the
    launcher at once: the file appears atomically (hard link of a complete temp file), so all
    callers read the same id."""
    existing = read_run_id(run_dir)
    if existing is not None:
        return existing
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{RUN_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(uuid.uuid4().hex[:16] + "\n")
    try:
        os.link(tmp, directory / RUN_ID_FILE)
    except FileExistsError:
        pass  # another process created it first; its id wins
    finally:
        tmp.unlink()
    run_id = read_run_id(directory)
    assert run_id is not None
    return run_id
