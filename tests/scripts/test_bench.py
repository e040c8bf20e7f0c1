"""The benchmark suite runner: sections land between their markers, other sections stay."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from scripts import bench
from scripts.report import REPO


def test_every_benchmark_has_an_entry_point():
    for _, module_name, _ in bench.BENCHMARKS:
        module = importlib.import_module(f"scripts.{module_name}")
        assert callable(getattr(module, "markdown", None) or getattr(module, "run", None))


def test_unknown_benchmark_is_one_line(capsys):
    assert bench.main(["--only", "nope", "--out", "-"]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_suite_writes_its_sections_and_keeps_the_others(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n<!-- throughput:begin -->\nkept\n<!-- throughput:end -->\n")
    subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--only", "reshard",
                    "--out", str(report)], cwd=REPO, check=True, timeout=600,
                   env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    text = report.read_text()
    assert "kept" in text
    assert "## Machine" in text and "MiB/s" in text
    assert "## Reshard load" in text and "cross-layout load" in text
    assert "ds_to_universal" in text and "DeepSpeed total / Perennial" in text
