"""`perennial clean RUN_DIR` frees the memory killed runs left, never a live keeper's."""

from __future__ import annotations

import os
import shutil

from launch.cli import main
from launch.keepers import KEEPER_PID_FILE, SHM_BASE, job_id


def test_clean_removes_left_memory_but_not_a_live_keepers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    left, live = (SHM_BASE / f"{job_id(str(run_dir))}-{name}" for name in ("dead0run", "live0run"))
    try:
        for root in (left, live):
            (root / "node0").mkdir(parents=True)
            (root / "node0" / "rank-00000.slot0").write_bytes(b"\0" * 4096)
        (live / "node0" / KEEPER_PID_FILE).write_text(str(os.getpid()))  # a process that lives
        (left / "node0" / KEEPER_PID_FILE).write_text("999999999")  # no such process
        assert main(["clean", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert not left.exists() and f"removed {left}" in out
        assert live.exists() and "its keeper is running" in out
    finally:
        for root in (left, live):
            shutil.rmtree(root, ignore_errors=True)
