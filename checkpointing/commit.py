"""Commit protocol and discovery of checkpoints on disk.

Layout of a checkpoint root:

    root/
      step-00000100/           committed checkpoints (only ever created by an atomic rename)
      .tmp-step-00000200-ab12/ a save in progress, or left by a crashed writer (ignored)
      latest                   name of the newest committed checkpoint (a hint, not trusted)
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from checkpointing.format import (
    INDEX_FILE,
    LATEST_FILE,
    STATE_FILE,
    STEP_DIR_PATTERN,
    CheckpointDamaged,
    read_index,
    read_json,
    step_dir_name,
)

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Candidate:
    """A committed checkpoint directory; `problem` is None when the structural check passed."""

    path: Path
    step: int
    problem: str | None


def new_temp_dir_name(step: int) -> str:
    return f"{TMP_PREFIX}{step_dir_name(step)}-{secrets.token_hex(4)}"


def remove_stale_temp_dirs(root: Path, keep_name: str) -> None:
    """Delete temp dirs/files left by crashed writers (any but the one being written now)."""
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or entry.name == keep_name:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def commit(root: Path, temp_dir: Path, step: int) -> Path:
    """Atomically publish a fully written temp dir as `step-XXXXXXXX` and point `latest` at it.

    Called on one rank after every rank has fsynced its shard files and index.json is written.
    """
    final = root / step_dir_name(step)
    fsync_path(temp_dir)
    if final.exists():  # re-saving a step (e.g. after resuming at it): move the old one aside
        old = root / f"{TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, old)
        os.rename(temp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temp_dir, final)
    fsync_path(root)
    write_latest(root, final.name)
    return final


def write_latest(root: Path, name: str) -> None:
    temp = root / f"{TMP_PREFIX}{LATEST_FILE}-{secrets.token_hex(4)}"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, root / LATEST_FILE)
    fsync_path(root)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep`; returns what was deleted."""
    doomed = [path for _, path in committed_dirs(root)[keep:]]
    for path in doomed:
        # Rename first so a half-deleted directory never looks like a committed checkpoint.
        trash = root / f"{TMP_PREFIX}deleted-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of committed checkpoints, newest first, from directory names alone."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR_PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def structural_problem(checkpoint: Path) -> str | None:
    """A cheap check without reading tensor data: the first of `metadata_problems`."""
    problems = metadata_problems(checkpoint)
    return problems[0] if problems else None


def metadata_problems(checkpoint: Path) -> list[str]:
    """The check every reader shares (loads, `init.from`, `ckpt verify`): index.json and
    state.json parse and match their checksums and each other, every shard file has its size.
    Shard headers and tensor blocks are checked where they are read (reading.ShardFiles)."""
    problems: list[str] = []
    index = _parsed(read_index, checkpoint, problems)
    state = _parsed(read_json, checkpoint / STATE_FILE, problems)
    if index is None:
        return problems
    if state is not None and state.get("step") != index.step:
        problems.append(f"{STATE_FILE} is for step {state.get('step')!r}, {INDEX_FILE} for "
                        f"step {index.step}")
    for name, info in sorted(index.files.items()):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != info["size"]:
            problems.append(f"{name} has {size} bytes, the index expects {info['size']} "
                            "(truncated?)")
    return problems


def _parsed(read, path: Path, problems: list[str]):
    try:
        return read(path)
    except CheckpointDamaged as err:
        problems.append(str(err))
        return None


def find_loadable(checkpoint_dir: str | os.PathLike) -> list[Candidate]:
    """Committed checkpoints under a checkpoint root or run directory, newest first.

    Steps come from the committed directory names, not from `latest`. Each candidate carries the
    reason it fails the structural check, or None.
    """
    root = resolve_root(checkpoint_dir)
    return [Candidate(path, step, structural_problem(path)) for step, path in committed_dirs(root)]


def resolve_root(path: str | os.PathLike) -> Path:
    """The checkpoint root for a checkpoint root or a run directory (holding `checkpoints/`)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not committed_dirs(path):
        return path / "checkpoints"
    return path


def is_checkpoint_dir(path: Path) -> bool:
    return bool(STEP_DIR_PATTERN.match(path.name)) or (path / INDEX_FILE).exists()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """One checkpoint directory from a checkpoint dir, checkpoint root or run directory.

    For a root or run directory this is the newest committed checkpoint (by step in the
    directory name). Raises ValueError when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if is_checkpoint_dir(path):
        return path
    committed = committed_dirs(resolve_root(path))
    if not committed:
        raise ValueError(f"no committed checkpoint (step-* directory) found under {path}")
    return committed[0][1]
