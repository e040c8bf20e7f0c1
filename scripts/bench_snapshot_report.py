"""The markdown section and the stall plot of scripts/bench_snapshot.py."""

from __future__ import annotations

import statistics
from pathlib import Path

from scripts import bench_snapshot_jobs as jobs
from scripts.report import fmt_seconds, machine_facts, median_spread, verdict

PERSIST_ROWS = {  # key -> label
    "raw": "raw sequential write + fsync (from memory)",
    "copy": "keeper's file copy alone (`copy_durably`)",
    "persist": "keeper persist: complete snapshot -> committed (copy + fsync + index + commit)",
    "keeper": "keeper end to end (snapshot crc32, then the persist)",
}
FLOOR = "memcpy into preallocated memory (floor)"
OURS = "Perennial snapshot, wait right away"
OVERLAPPED = "Perennial snapshot, overlapped with compute"
DCP_DEFAULT = "DCP dcp.async_save, default stager"
DCP_REUSED = "DCP dcp.async_save, reused stager"
DCP_OVERLAPPED = "DCP dcp.async_save, async staging, overlapped"
NOTES = {
    FLOOR: "`dst.copy_(src)` per tensor",
    "torch.save to disk (no fsync)": "serialise + write to page cache",
    "DCP dcp.save": "plan + write + fsync",
    DCP_DEFAULT: "until it returns: fresh host copy, then writes in a thread",
    DCP_REUSED: "until it returns: copy into cached host buffers",
    OURS: "`snapshot()` + `wait_copied()` at once: copy into the keeper's /dev/shm",
    DCP_OVERLAPPED: "until it returns + wait for staging after a compute step ran meanwhile",
    OVERLAPPED: "`snapshot()` + `wait_copied()` after a compute step ran meanwhile",
}


def _median(samples: list[float]) -> float:
    return median_spread(samples)[0]


def fmt_ms(samples: list[float]) -> str:
    median, spread = median_spread(samples)
    return f"{median * 1e3:,.2f} ± {spread * 1e3:,.2f}"


def stall_section(stalls: dict[str, list[float]]) -> list[str]:
    floor = _median(stalls[FLOOR])
    lines = ["### 1. Training stall per checkpoint", "",
             "| method | stall (ms) | vs memcpy floor | what blocks the loop |",
             "|---|---|---|---|"]
    for label, note in NOTES.items():
        lines.append(f"| {label} | {fmt_ms(stalls[label])} | "
                     f"{_median(stalls[label]) / floor:.2f}x | {note} |")
    alone = _median(stalls["compute alone"])
    ours_beside = _median(stalls[f"compute beside: {OVERLAPPED}"])
    dcp_beside = _median(stalls[f"compute beside: {DCP_OVERLAPPED}"])
    ours, dcp_default, dcp_reused = (_median(stalls[k]) for k in (OURS, DCP_DEFAULT, DCP_REUSED))
    ours_over, dcp_over = _median(stalls[OVERLAPPED]), _median(stalls[DCP_OVERLAPPED])
    lines += [
        "",
        f"The overlapped rows' compute step (1-thread matmuls sized to ~2x the copy) took "
        f"{alone * 1e3:,.1f} ms alone, {ours_beside * 1e3:,.1f} ms beside our copy "
        f"({ours_beside / alone - 1:+.0%}) and {dcp_beside * 1e3:,.1f} ms beside DCP's staging "
        f"({dcp_beside / alone - 1:+.0%}): on CPU a hidden copy is not free, it shares cores and "
        "memory bandwidth with the step it hides behind.",
        "",
        "![checkpoint stall per method](snapshot_stall.png)",
        "",
        f"- Target: our stall ≤ 1.5x the memcpy floor. Measured: {ours / floor:.2f}x "
        f"({verdict(ours <= 1.5 * floor)}).",
        f"- Target: ≥ 3x lower than DCP async_save. Measured: {dcp_default / ours:.1f}x lower "
        f"than the default stager ({verdict(dcp_default >= 3 * ours)}), {dcp_reused / ours:.1f}x "
        f"lower than a reused stager ({verdict(dcp_reused >= 3 * ours)}); overlapped, both "
        f"hidden behind compute: {dcp_over / ours_over:.1f}x lower "
        f"({verdict(dcp_over >= 3 * ours_over)}).",
    ]
    return lines


def persist_section(slot_bytes: int, persist: dict[str, list[float]]) -> list[str]:
    raw = statistics.median(persist["raw"])
    lines = ["### 2. Persist bandwidth", "",
             f"The same {slot_bytes / 2**20:,.0f} MiB slot (a safetensors shard) written to the "
             "same local disk; MB/s = MiB per second, median ± half-range.", "",
             "| write | MB/s | vs raw |", "|---|---|---|"]
    for key, label in PERSIST_ROWS.items():
        median, spread = median_spread(persist[key])
        lines.append(f"| {label} | {median:,.0f} ± {spread:,.0f} | {median / raw:.2f}x |")
    ours = statistics.median(persist["persist"]) / raw
    end_to_end = statistics.median(persist["keeper"]) / raw
    lines += ["", "The crc32 pass belongs to the snapshot, not to the persist: a snapshot counts "
                  "for recovery only once checksummed, persisted or not, and the persist reuses "
                  "those checksums for the on-disk index.", "",
              f"Target: keeper persist ≥ 0.70x raw write bandwidth. Measured: {ours:.2f}x "
              f"({verdict(ours >= 0.7)}); with the snapshot's crc32 pass included: "
              f"{end_to_end:.2f}x."]
    return lines


def throughput_section(throughput: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = ["### 3. Training throughput with snapshots", "",
             "`perennial train`, one process; the variants of a job alternate run by run; tokens/s "
             "over each 10-step interval after 10 warm-up steps.", "",
             "| job | snapshots | tokens/s (median) | min – max | loss vs off |",
             "|---|---|---|---|---|"]
    costs = []
    losses = {}
    for job, variants in throughput.items():
        off = statistics.median(variants["snapshots off"])
        for label, rates in variants.items():
            median = statistics.median(rates)
            lines.append(f"| {job} | {label} | {median:,.0f} | {min(rates):,.0f} – "
                         f"{max(rates):,.0f} | {1 - median / off:.1%} |")
        losses[job] = 1 - statistics.median(variants["snapshot every 10 steps"]) / off
        every = statistics.median(variants["snapshot every step"])
        tokens = jobs.TOKENS_PER_STEP.get(job, 0)
        costs.append(f"{job}: {(1 / every - 1 / off) * tokens * 1e3:.1f} ms")
    lines += ["", "Per-snapshot cost (extra wall time at one snapshot every step): "
              + "; ".join(costs) + "."]
    for job, loss in losses.items():
        lines.append(f"- Target: ≤ 5% throughput loss at one snapshot every 10 steps. {job}: "
                     f"{loss:.1%} ({verdict(loss <= 0.05)}).")
    return lines


def recovery_section(recovery: dict[str, list[dict]]) -> list[str]:
    lines = ["### 4. Recovery from a SIGKILLed worker", "",
             "`perennial train --nproc 2 --max-restarts 1` (FSDP2), one worker SIGKILLed right "
             f"after step {jobs.KILL_AT} is logged; torchrun restarts both workers, which resume "
             "from the newest tier. Times from the SIGKILL to the line arriving; the last column "
             "includes recomputing the lost steps.", "",
             "| tier | resumed from | steps lost | kill → resumed (s) | kill → next step (s) | "
             "kill → step reached before the kill (s) |", "|---|---|---|---|---|---|"]
    for label, runs in recovery.items():
        cells = [fmt_seconds([r[k] for r in runs]) for k in ("resumed", "next step", "regained")]
        lost = ", ".join(str(r["steps lost"]) for r in runs)
        sources = ", ".join(sorted({r["source"] for r in runs}))
        lines.append(f"| {label} | {sources} | {lost} | {' | '.join(cells)} |")
    return lines


def plot(stalls: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(NOTES)
    medians = [_median(stalls[k]) for k in labels]
    spreads = [median_spread(stalls[k])[1] for k in labels]
    colors = ["tab:green" if k.startswith("Perennial") else "tab:gray" for k in labels]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(labels[::-1], medians[::-1], xerr=spreads[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("training stall per checkpoint (s, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(state_bytes, stalls, slot_bytes, persist, throughput, recovery, sizes, quick,
           plot_path: Path | None) -> str:
    if plot_path is not None:
        plot(stalls, plot_path)
    repeats = len(stalls[FLOOR])
    lines = [
        "## Memory snapshots (`scripts/bench_snapshot.py`)", "",
        f"Machine: {machine_facts()}. State: {state_bytes / 2**30:.2f} GiB fp32 "
        f"({sizes['depth']} Linear({sizes['width']}, {sizes['width']}) weights + exp_avg + "
        f"exp_avg_sq){' — quick mode' if quick else ''}; one process, 1 thread; the keeper is "
        f"the real keeper process. Median ± half-range of {repeats} samples per method, "
        "methods interleaved, after one untimed warm-up round.", "",
        *stall_section(stalls), "", *persist_section(slot_bytes, persist), "",
        *throughput_section(throughput), "", *recovery_section(recovery),
    ]
    return "\n".join(lines)
