"""The scaling benchmark: its report on known numbers, and (slow) a real `--quick` run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from launch.keepers import SHM_BASE
from scripts import bench_scaling as bench
from scripts import bench_scaling_jobs as jobs
from scripts.report import REPO

MIB = 1 << 20


def size_result(mib: int, skipped_deepspeed: bool = False) -> dict:
    """Every method costs (its index + 1) x the floor, plus 1 ms fixed for ours."""
    stalls = {label: [(i + 1) * mib * 1e-4] * 2 for i, label in enumerate(bench.METHODS)}
    stalls[bench.OURS] = [mib * 1e-4 + 1e-3] * 2
    skipped = {bench.DEEPSPEED: None}
    if skipped_deepspeed:
        del stalls[bench.DEEPSPEED]
        skipped[bench.DEEPSPEED] = "not run: needs ~9.0 GiB, 4.0 GiB available"
    return {"bytes": mib * MIB, "stalls": stalls, "skipped": skipped}


def test_size_section_has_every_method_a_ratio_and_the_fit():
    results = [size_result(256), size_result(1024), size_result(2048, skipped_deepspeed=True)]
    text = "\n".join(bench.size_section(results, ""))
    for label in bench.METHODS:
        assert text.count(f"| {label} |") == 4, label  # three sizes + the fit table
    assert "| DCP dcp.save | 76.8 ± 0.0 | 3.00x |" in text  # 256 MiB: 3 x 25.6 ms
    assert "| DeepSpeed engine.save_checkpoint, ZeRO-1 | not run: needs ~9.0 GiB" in text
    assert "**2.00 GiB of state**" in text and "**256 MiB of state**" in text
    # the fit recovers the 1 ms fixed cost and the same per-GiB cost as the floor
    assert f"| {bench.OURS} | 1.0 | 102 | 1.00x |" in text


def test_deepspeed_is_left_out_when_it_cannot_fit(tmp_path):
    saver, reason = bench.deepspeed_or_reason(8, 1, tmp_path, 10**15)
    assert saver is None and reason.startswith("not run: needs ~")


def test_ranks_section_reports_the_trend():
    results = {world: {"rank_bytes": 512 * MIB // world, "bytes": 512 * MIB,
                       "stalls": {"ours": [0.1 / world] * 2, "dcp": [0.4 / world] * 2},
                       "loads": {"ours": [1.0] * 2, "dcp": [0.5] * 2}}
               for world in jobs.WORLD_SIZES}
    text = "\n".join(jobs.ranks_section(results))
    assert "| 2 | 256.0 | 50.0 ± 0.0 | 200.0 ± 0.0 | 4.0x | 1,000.0 ± 0.0 | 500.0 ± 0.0 |" in text
    assert "Perennial stall 1.00 / 0.50 / 0.25" in text


@pytest.mark.slow
def test_quick_run_reports_every_method_and_rank_count(tmp_path):
    before = set(SHM_BASE.iterdir()) if SHM_BASE.exists() else set()
    plot = tmp_path / "scaling_stall.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "scripts/bench_scaling.py", "--quick", "--out", "-",
                           "--plot", str(plot)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = proc.stdout[proc.stdout.index("## Scaling"):]
    for label in bench.METHODS:
        row = rf"\| {re.escape(label)} \| [\d.,]+ ± [\d.,]+ \| [\d.]+x \|"
        assert re.search(row, report), label
    for world in jobs.WORLD_SIZES:
        assert re.search(rf"\n\| {world} \| [\d.]+ \| .* \| [\d.]+x \|", report), world
    if importlib.util.find_spec("matplotlib"):
        assert f"![checkpoint stall vs state size]({plot.name})" in report and plot.exists()
    else:
        assert "No plot: matplotlib is not installed" in report
    after = set(SHM_BASE.iterdir()) if SHM_BASE.exists() else set()
    assert after <= before, f"shared memory left behind: {after - before}"
