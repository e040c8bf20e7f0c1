"""The benchmark suite: every benchmark under scripts/, one run, one report.

    python scripts/bench.py                      # full sizes, rewrites docs/benchmarks.md
    python scripts/bench.py --quick --out -      # a few minutes, prints the report only
    python scripts/bench.py --only reshard,throughput

Each benchmark measures Perennial side by side with the tool a user would pick instead, in the
same run and on the same state, and returns its own markdown section (tables with median and
spread, ratios, the target next to each measured ratio). The suite adds the machine facts,
including the disk write bandwidth it measures, and writes each section between its markers in
docs/benchmarks.md, so a partial run (`--only`) leaves the other sections as they were.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.report import BENCHMARKS_MD, disk_write_bandwidth, machine_facts, replace_section  # noqa: E402

# (section marker, module under scripts/, what it compares); run in this order.
BENCHMARKS = [
    ("snapshot", "bench_snapshot", "checkpoint stall, persist, snapshot throughput, recovery"),
    ("scaling", "bench_scaling", "checkpoint stall vs state size and vs ranks"),
    ("reshard", "bench_reshard", "same- vs cross-layout load, vs torch DCP"),
    ("save", "bench_save", "non-blocking save stall vs dcp.async_save and memcpy"),
    ("ds_import", "bench_ds_import", "ckpt import vs DeepSpeed ds_to_universal"),
    ("throughput", "bench_throughput", "perennial train vs a bare PyTorch loop"),
    ("data", "bench_data", "data prepare 1 vs 2 processes, memory vs corpus size, shard loading"),
    ("memory", "bench_memory", "peak memory per rank vs world size (FSDP2)"),
    ("moe", "bench_moe", "MoE grouped experts vs the per-expert loop"),
    ("pp", "bench_pp", "pipeline pp=2 vs pp=1 and FSDP2 dp=2 throughput"),
]


def section_markdown(module_name: str, quick: bool) -> str:
    module = importlib.import_module(f"scripts.{module_name}")
    entry = getattr(module, "markdown", None) or module.run
    return entry(quick)


def machine_section(quick: bool) -> str:
    with tempfile.TemporaryDirectory(dir=Path(BENCHMARKS_MD).parents[1]) as scratch:
        bandwidth = disk_write_bandwidth(scratch, 64 * 2**20 if quick else 1024 * 2**20)
    return "\n".join([
        "## Machine",
        "",
        f"{machine_facts()}. Sequential write + fsync to the repository's disk: "
        f"{bandwidth / 2**20:,.0f} MiB/s. Suite run: `python scripts/bench.py"
        f"{' --quick' if quick else ''}`.",
    ])


def run_suite(names: list[str], quick: bool, out: str) -> str:
    sections = [("machine", machine_section(quick))]
    for marker, module_name, what in BENCHMARKS:
        if marker not in names:
            continue
        print(f"== {marker}: {what}", flush=True)
        start = time.perf_counter()
        sections.append((marker, section_markdown(module_name, quick)))
        print(f"== {marker}: done in {time.perf_counter() - start:.0f} s", flush=True)
    if out != "-":
        for marker, body in sections:
            replace_section(marker, body, Path(out))
    return "\n\n".join(body for _, body in sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--out", default=str(BENCHMARKS_MD), help="report file, or - to print")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = parser.parse_args(argv)
    known = [marker for marker, _, _ in BENCHMARKS]
    names = [n for n in args.only.split(",") if n] or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        print(f"error: --only: unknown benchmark(s) {unknown}; known: {known}", file=sys.stderr)
        return 2
    text = run_suite(names, args.quick, args.out)
    if args.out == "-":
        print(text)
    else:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
