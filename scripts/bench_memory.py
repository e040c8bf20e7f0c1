"""Memory benchmark: peak host memory per rank of `perennial train` (FSDP2) vs world size.

    python scripts/bench_memory.py                 # a >= 400 MB fp32 model on 1, 2, 4 ranks
    python scripts/bench_memory.py --quick --out -  # a ~30 MB model, prints the report only

Each point is the largest rank's peak RSS (`peak_rss_gib` in metrics.jsonl) of a 2-step run,
minus the same layout's peak for a tiny model (the process baseline: torch, gloo, data). A
sharded trainer holds weights, grads and two Adam moments (16 bytes per parameter) divided by
N, plus FSDP2's all-gathered block. Target (issue 13): above the baseline <= 1.25 x 16 P / N.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.report import BENCHMARKS_MD, emit, machine_facts, verdict  # noqa: E402

TARGET = 1.25
JOB = ["data.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=1",
       "train.log_interval=1", "eval.interval=0", "log.progress=false",
       "checkpoint.enabled=false", "train.max_steps=2", "schedule.warmup_steps=1"]
TINY = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4, "ffn_dim": 64}
# dim 1024, 8 layers, ffn 4096: 8 x 16.8 M + 0.5 M = 135 M parameters, 541 MB of fp32 weights.
FULL = {"dim": 1024, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "ffn_dim": 4096}
QUICK = {"dim": 256, "n_layers": 8, "n_heads": 4, "n_kv_heads": 4, "ffn_dim": 1024}


def parameters(model: dict, vocab: int = 259) -> int:
    dim, ffn = model["dim"], model["ffn_dim"]
    kv = dim * model["n_kv_heads"] // model["n_heads"]
    per_layer = 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn + 2 * dim
    return model["n_layers"] * per_layer + 2 * vocab * dim + dim


def peak_rss_gib(workdir: Path, name: str, nproc: int, model: dict) -> float:
    """The largest rank's peak RSS of a short FSDP2 run of `model`."""
    from tests.trainer.runs import perennial

    run_dir = workdir / f"{name}-{nproc}"
    overrides = [f"model.{k}={v}" for k, v in model.items()]
    perennial("train", f"run.dir={run_dir}", f"data.cache_dir={workdir / 'cache'}", *JOB,
              *overrides, "parallel.strategy=fsdp", "--nproc", str(nproc), timeout=3600)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)["peak_rss_gib"] for line in lines if line.strip())


def measure(quick: bool, world_sizes: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    model = QUICK if quick else FULL
    state_gib = 16 * parameters(model) / 2**30
    rows = []
    with tempfile.TemporaryDirectory() as root:
        workdir = Path(root)
        for nproc in world_sizes:
            base = peak_rss_gib(workdir, "tiny", nproc, TINY)
            peak = peak_rss_gib(workdir, "model", nproc, model)
            ideal = state_gib / nproc
            rows.append({"ranks": nproc, "baseline_gib": base, "peak_gib": peak,
                         "above_gib": peak - base, "ideal_gib": ideal,
                         "ratio": (peak - base) / ideal})
    return rows


def markdown(quick: bool) -> str:
    model = QUICK if quick else FULL
    params = parameters(model)
    rows = measure(quick)
    lines = [
        "## Memory per rank",
        "",
        f"`perennial train`, FSDP2, {params / 1e6:.0f} M parameters ({4 * params / 2**20:,.0f} MiB "
        f"of fp32 weights, {16 * params / 2**30:.2f} GiB with grads and Adam moments), 2 steps, "
        "checkpoints off. Peak RSS of the largest rank minus the same layout's tiny-model peak; "
        "the ideal is (weights + grads + 2 moments) / N. Expected trend: 1/N. "
        f"{machine_facts()}.",
        "",
        "| ranks | baseline GiB | peak GiB | above baseline GiB | ideal GiB | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['baseline_gib']:.2f} | {row['peak_gib']:.2f} | "
            f"{row['above_gib']:.3f} | {row['ideal_gib']:.3f} | {row['ratio']:.2f}x | "
            f"<= {TARGET}x: {verdict(row['ratio'] <= TARGET)} |"
        )
    first, last = rows[0], rows[-1]
    shrink = first["above_gib"] / max(last["above_gib"], 1e-9)
    ideal = last["ranks"] / first["ranks"]
    lines += ["", f"1/N trend: {first['ranks']} -> {last['ranks']} ranks shrinks the per-rank "
              f"peak above the baseline {shrink:.1f}x (ideal {ideal:.0f}x); "
              f"{verdict(shrink >= 0.5 * ideal)} (at least half the ideal)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(BENCHMARKS_MD), help="report file, or - to print")
    args = parser.parse_args(argv)
    emit("memory", markdown(args.quick), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
