"""Every randomised test prints its seed: the clock-seeded ones through tests/seeds.py, the
property tests through the hypothesis profile in tests/conftest.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.seeds import replayable_seed

REPO = Path(__file__).resolve().parents[1]
# An RNG seeded from the clock or the OS, or left to seed itself, outside tests/seeds.py.
UNPRINTED_SEED = re.compile(
    r"(Random|seed|rng)\(.*(time\.time|time_ns|urandom)|random\.Random\(\)|default_rng\(\)"
)


def test_seed_is_printed_and_replayable(monkeypatch, capsys):
    monkeypatch.delenv("SOME_SEED", raising=False)
    drawn = replayable_seed("SOME_SEED")
    assert f"random seed {drawn}: replay with SOME_SEED={drawn}" in capsys.readouterr().out
    monkeypatch.setenv("SOME_SEED", str(drawn))
    assert replayable_seed("SOME_SEED") == drawn


def test_no_test_or_benchmark_draws_an_unprinted_seed():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for folder in ("tests", "scripts")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "seeds.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if UNPRINTED_SEED.search(line) and "UNPRINTED_SEED" not in line
    ]
    assert not offenders, "seed these with tests.seeds.replayable_seed:\n" + "\n".join(offenders)


def test_property_test_failures_print_a_replay_blob(tmp_path):
    test_file = tmp_path / "test_prop.py"
    test_file.write_text(
        "from hypothesis import given, strategies as st\n"
        "@given(st.integers())\n"
        "def test_small(x):\n"
        "    assert x < 1000\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         str(test_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "@reproduce_failure(" in proc.stdout, proc.stdout
