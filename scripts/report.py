"""Shared pieces of the benchmark reports: machine facts, timing statistics, and rewriting one
marked section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


def machine_facts() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{mem_gib:.0f} GiB RAM, {device}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; measured {time.strftime('%Y-%m-%d')}"
    )


def median_spread(samples: list[float]) -> tuple[float, float]:
    """Median and half the min–max range."""
    return statistics.median(samples), (max(samples) - min(samples)) / 2


def fmt_seconds(samples: list[float]) -> str:
    median, spread = median_spread(samples)
    return f"{median:.3f} ± {spread:.3f}"


def fmt_ms(samples: list[float]) -> str:
    """Seconds as milliseconds: median ± half-range."""
    median, spread = median_spread(samples)
    return f"{median * 1e3:,.1f} ± {spread * 1e3:,.1f}"


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def emit(section: str, text: str, out: str) -> None:
    """Print the report (`out` is -) or write it as `section` of the markdown file `out`."""
    if out == "-":
        print(text)
    else:
        replace_section(section, text, Path(out))
        print(f"wrote the {section} section of {out}")


def section_main(section: str, markdown, doc: str) -> None:
    """The command line of a benchmark whose section is `markdown(quick)`: --quick, --out."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    emit(section, markdown(args.quick), args.out)


def rate_table(what: str, base_name: str, results: dict[str, list[float]], base: float):
    """Markdown rows: per label the median tokens/s, its range and the ratio to `base`."""
    rows = [f"| {what} | tokens/s (median) | min – max | vs {base_name} |", "|---|---|---|---|"]
    for label, rates in results.items():
        median = statistics.median(rates)
        rows.append(f"| {label} | {median:,.0f} | {min(rates):,.0f} – {max(rates):,.0f} | "
                    f"{median / base:.3f}x |")
    return rows


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def disk_write_bandwidth(directory: str | os.PathLike, nbytes: int = 256 * 2**20) -> float:
    """Sequential write + fsync of `nbytes` into `directory`, in bytes per second."""
    block = os.urandom(4 * 2**20)
    path = Path(directory) / "bench-disk-probe.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return max(1, nbytes // len(block)) * len(block) / elapsed
