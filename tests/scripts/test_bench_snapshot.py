"""The snapshot benchmark: its report logic on known numbers, and (slow) a real `--quick` run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch.keepers import SHM_BASE
from scripts import bench_snapshot as bench
from scripts import bench_snapshot_jobs as jobs
from scripts import bench_snapshot_report as rep
from scripts.report import REPO

SIZES = bench.SIZES[True]


def fake_results(ours_stall: float, keeper_mbps: float, off: float, every10: float):
    stalls = {label: [0.010, 0.011, 0.012] for label in rep.NOTES}
    stalls[rep.FLOOR] = [0.010] * 3
    stalls[rep.OURS] = [ours_stall] * 3
    stalls[rep.OVERLAPPED] = [0.001] * 3
    stalls[rep.DCP_DEFAULT] = stalls[rep.DCP_REUSED] = stalls[rep.DCP_OVERLAPPED] = [0.05] * 3
    for key in ("compute alone", *(f"compute beside: {k}" for k in bench.OVERLAPPED)):
        stalls[key] = [0.02] * 3
    persist = {"raw": [1000.0] * 3, "copy": [950.0] * 3, "persist": [keeper_mbps] * 3,
               "keeper": [keeper_mbps / 2] * 3}
    variants = {label: [off] * 2 for label in jobs.THROUGHPUT_VARIANTS}
    variants["snapshot every 10 steps"] = [every10] * 2
    throughput = {"job A": variants}
    run = {"resumed": 1.0, "next step": 1.5, "regained": 2.0, "steps lost": 1, "source": "x"}
    recovery = {label: [run] for label in jobs.RECOVERY_VARIANTS}
    return stalls, persist, throughput, recovery


def render(*args) -> str:
    stalls, persist, throughput, recovery = fake_results(*args)
    return rep.report(2**30, stalls, 2**30, persist, throughput, recovery, SIZES, True, None)


def test_verdicts_follow_the_targets():
    good = render(0.012, 800.0, 1000.0, 960.0)
    assert "not met" not in good
    assert good.count("(met)") == 6  # memcpy, 3x DCP (three ways), persist, throughput
    bad = render(0.020, 600.0, 1000.0, 900.0)
    assert "Measured: 2.00x (**not met**)" in bad  # stall vs memcpy floor
    assert "Measured: 0.60x (**not met**)" in bad  # persist vs raw
    assert "job A: 10.0% (**not met**)" in bad  # throughput at every 10 steps


def row_labels() -> list[str]:
    return [*rep.NOTES, *rep.PERSIST_ROWS.values(), *jobs.THROUGHPUT_VARIANTS,
            *jobs.RECOVERY_VARIANTS]


def test_report_has_every_row_once():
    text = render(0.012, 800.0, 1000.0, 960.0)
    for label in row_labels():
        assert text.count(f"| {label} |") == 1, label
        assert f"| {label} | " in text


@pytest.mark.slow
def test_quick_run_reports_every_row(tmp_path):
    before = set(SHM_BASE.iterdir()) if SHM_BASE.exists() else set()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "scripts/bench_snapshot.py", "--quick", "--out", "-"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = proc.stdout[proc.stdout.index("## Memory snapshots"):]
    for label in row_labels():
        assert f"| {label} |" in report, label
    assert "| memory tier (snapshot every 2 steps) | memory |" in report
    assert "| disk tier (checkpoint every 5 steps) | disk |" in report
    after = set(SHM_BASE.iterdir()) if SHM_BASE.exists() else set()
    assert after <= before, f"shared memory left behind: {after - before}"
