"""The DeepSpeed import benchmark runs end to end (quick size) and reports both tools."""

import re

import pytest

from scripts.bench_ds_import import run


@pytest.mark.slow
def test_quick_run_reports_both_tools():
    text = run(quick=True)
    assert "## DeepSpeed import" in text
    times = re.findall(r"\| ([0-9.]+) \|", text)
    assert len(times) == 4 and all(float(t) > 0 for t in times)  # ours, theirs, 2 floors
    assert re.search(r"Measured: [0-9.]+x", text)
