"""Model growth experiment on CPU: is a grown model better than the alternative at equal steps?

A shallow dense Llama is pretrained on English prose (`stdlib:prose`). Then, each for the same
number of steps, on the same data stream and LR schedule:

  dense_continued   the shallow dense model keeps training (init.from, optimizer carried)
  upcycled          `perennial grow upcycle` (E experts, top-k, exact at init), then trained
  deep_scratch      a model twice as deep, trained from a random init
  gstack            `perennial grow stack --method gstack --factor 2` of the shallow model
  deep_long         the deep model from scratch for pretrain + grown steps: as many tokens as
                    the shallow model and its G_stack saw together (Du et al.'s comparison)

Comparisons: upcycled vs dense_continued (same start, more parameters), gstack vs deep_scratch
(equal steps after growth) and gstack vs deep_long (equal total tokens). Held-out prose loss
(nats/byte). Runs after growth use another data seed than the pretraining, so they do not
replay its first batches in order (init.from does not carry the data position).

    python scripts/growth_experiment.py           # ~3-4 min on 2 CPU cores; writes docs/growth.*
    python scripts/growth_experiment.py --quick --out-dir /tmp/g   # < 60 s, report in out-dir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DOC_NAME, PLOT_NAME = "growth.md", "growth.png"
RUNS = ("dense_continued", "upcycled", "deep_scratch", "gstack")
GROWN_SEED = 2
PAIRS = (("dense_continued", "upcycled"), ("deep_scratch", "gstack"))
LABELS = {
    "dense_continued": "dense, continued",
    "upcycled": "upcycled MoE",
    "deep_scratch": "2x deep, from scratch",
    "gstack": "G_stack (2x) of the trained shallow model",
    "deep_long": "2x deep, from scratch, pretrain + grown steps",
}


@dataclass(frozen=True)
class Scale:
    dim: int
    n_layers: int
    seq_len: int
    batch: int
    pretrain_steps: int
    grown_steps: int
    eval_interval: int
    eval_batches: int
    num_experts: int = 4
    top_k: int = 2


SCALES = {
    "full": Scale(dim=96, n_layers=2, seq_len=128, batch=16, pretrain_steps=300,
                  grown_steps=200, eval_interval=20, eval_batches=6),
    "quick": Scale(dim=32, n_layers=1, seq_len=32, batch=4, pretrain_steps=6,
                   grown_steps=4, eval_interval=2, eval_batches=1),
}  # fmt: skip


def job(scale: Scale, run_dir: Path, cache: Path, steps: int, n_layers: int) -> dict:
    return {
        "run": {"dir": str(run_dir)},
        "model": {"dim": scale.dim, "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2},
        "data": {"seq_len": scale.seq_len, "cache_dir": str(cache),
                 "eval_batches": scale.eval_batches},
        "train": {"max_steps": steps, "global_batch_size": scale.batch,
                  "micro_batch_size": scale.batch, "log_interval": scale.eval_interval},
        "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 20), "min_lr": 3e-4},
        "optim": {"lr": 3e-3},
        "eval": {"interval": scale.eval_interval},
        "log": {"progress": False},
        "checkpoint": {"persist_interval": steps, "keep": 1},
    }  # fmt: skip


def grown_jobs(scale: Scale, out: Path, cache: Path) -> dict[str, dict]:
    """The four runs after growth: equal steps, batch, sequence length and schedule."""
    steps, deep = scale.grown_steps, 2 * scale.n_layers
    jobs = {
        "dense_continued": job(scale, out / "dense_continued", cache, steps, scale.n_layers),
        "upcycled": job(scale, out / "upcycled", cache, steps, scale.n_layers),
        "deep_scratch": job(scale, out / "deep_scratch", cache, steps, deep),
        "gstack": job(scale, out / "gstack", cache, steps, deep),
    }
    for config in jobs.values():
        config["train"]["seed"] = GROWN_SEED
    jobs["upcycled"]["model"]["moe"] = {"num_experts": scale.num_experts, "top_k": scale.top_k}
    starts = {"dense_continued": out / "shallow", "upcycled": out / "shallow_upcycled",
              "gstack": out / "shallow_gstack"}  # fmt: skip
    for name, start in starts.items():
        jobs[name]["init"] = {"from": str(start), "load_optimizer": True}
    return jobs


# -- running ----------------------------------------------------------------------------------
def perennial(*args: str, log: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = log.open("w") if log else subprocess.DEVNULL
    try:
        code = subprocess.call([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    finally:
        if log:
            out.close()
    if code != 0:
        where = f"; see {log}" if log else ""
        raise RuntimeError(f"perennial {' '.join(args[:2])} exited {code}{where}")


def train(config: dict) -> float:
    """Trains one job in a fresh run dir; returns its wall time in seconds."""
    run_dir = Path(config["run"]["dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    path = run_dir.with_name(run_dir.name + ".yaml")
    OmegaConf.save(OmegaConf.create(config), path)
    start = time.perf_counter()
    perennial("train", str(path), log=run_dir.with_name(run_dir.name + ".log"))
    return time.perf_counter() - start


def grow(scale: Scale, out: Path) -> None:
    for target in ("shallow_upcycled", "shallow_gstack"):
        shutil.rmtree(out / target, ignore_errors=True)
    perennial("grow", "upcycle", str(out / "shallow"), str(out / "shallow_upcycled"),
              "--num-experts", str(scale.num_experts), "--top-k", str(scale.top_k))  # fmt: skip
    perennial("grow", "stack", str(out / "shallow"), str(out / "shallow_gstack"),
              "--method", "gstack", "--factor", "2")  # fmt: skip


# -- results (pure) ---------------------------------------------------------------------------
def eval_curve(run_dir: Path) -> dict[int, float]:
    """Step -> held-out prose loss, from metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    curve = {r["step"]: r["eval_loss"]["prose"] for r in records if "eval_loss" in r}
    if not curve:
        raise ValueError(f"{run_dir}/metrics.jsonl has no eval_loss")
    return curve


def deep_long_job(scale: Scale, out: Path, cache: Path) -> dict:
    steps = scale.pretrain_steps + scale.grown_steps
    return job(scale, out / "deep_long", cache, steps, 2 * scale.n_layers)


def param_counts(run_dir: Path) -> tuple[int, int]:
    """(total, active per token) parameters of the model in a run's config.yaml."""
    import torch
    import yaml

    from trainer.model import Llama
    from trainer.model.hf import model_config_from_dict

    model = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["model"]
    with torch.device("meta"):
        llama = Llama(model_config_from_dict(model))
    return llama.num_params(), llama.active_params()


def results_table(curves: Mapping[str, dict[int, float]], times: Mapping[str, float],
                  params: Mapping[str, tuple[int, int]] | None = None) -> str:  # fmt: skip
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    picks = sorted({common[max(0, round(len(common) * q) - 1)] for q in (0.25, 0.5, 1.0)})
    header = ["run", "params (active)", *[f"loss @ {s}" for s in picks], "train time"]
    rows = [header, ["---"] * len(header)]
    for name, curve in curves.items():
        total, active = (params or {}).get(name, (0, 0))
        losses = [f"{curve[s]:.3f}" for s in picks]
        size = f"{total / 1e6:.2f}M ({active / 1e6:.2f}M)"
        rows.append([LABELS[name], size, *losses, f"{times.get(name, 0):.0f} s"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def verdicts(curves: Mapping[str, dict[int, float]], pretrain_steps: int) -> list[str]:
    lines = []
    if "deep_long" in curves:
        long_end, end = max(curves["deep_long"]), max(curves["gstack"])
        delta = curves["gstack"][end] - curves["deep_long"][long_end]
        lines.append(f"- Equal total tokens ({pretrain_steps} shallow + {end} grown steps vs "
                     f"{long_end} deep steps): G_stack {curves['gstack'][end]:.3f}, deep from "
                     f"scratch {curves['deep_long'][long_end]:.3f} ({delta:+.3f}).")  # fmt: skip
        # a shallow step costs about half a deep one: equal compute is P/2 + C deep steps
        equal = min(curves["deep_long"], key=lambda s: abs(s - (pretrain_steps // 2 + end)))
        lines.append(f"- About equal compute (a shallow step ~ half a deep step): deep from "
                     f"scratch at step {equal}: {curves['deep_long'][equal]:.3f}.")  # fmt: skip
    for base, grown in PAIRS:
        end = max(set(curves[base]) & set(curves[grown]))
        delta = curves[grown][end] - curves[base][end]
        better = "lower (better)" if delta < 0 else "higher (worse)"
        lines.append(f"- {LABELS[grown]} vs {LABELS[base]} at step {end}: "
                     f"{delta:+.3f} nats/byte, {better}.")  # fmt: skip
    return lines


def plot(curves: Mapping[str, dict[int, float]], out_png: Path, pretrain_steps: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    shift = {"deep_long": pretrain_steps}  # aligned so that every run ends at the same x
    for ax, pair in zip(fig.subplots(1, 2), (PAIRS[0], (*PAIRS[1], "deep_long"))):
        for name in (n for n in pair if n in curves):
            steps = sorted(curves[name])
            x = [s - shift.get(name, 0) for s in steps]
            ax.plot(x, [curves[name][s] for s in steps], marker=".", label=LABELS[name])
        ax.set(xlabel="step after growth", ylabel="held-out prose loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(os.fspath(out_png), dpi=110)


def write_report(report_dir: Path, scale_name: str, scale: Scale, table: str,
                 lines: list[str], runtime: str) -> None:  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_note = f"![held-out loss after growth]({PLOT_NAME})"
    text = f"""# Model growth experiment ({scale_name})

Generated by `scripts/growth_experiment.py`{' --quick' if scale_name == 'quick' else ''}.
A dense Llama (width {scale.dim}, {scale.n_layers} layers, byte tokenizer, `stdlib:prose`) is
pretrained for {scale.pretrain_steps} steps. Each run below then trains {scale.grown_steps}
steps of {scale.batch} x {scale.seq_len} tokens with the same cosine schedule; runs that start
from the shallow model carry its AdamW state. Upcycling: {scale.num_experts} experts, top-
{scale.top_k}, renormalised (exact at init). G_stack: the {scale.n_layers}-layer stack repeated
twice. Loss = held-out prose, nats per byte. {runtime}

{table}

{chr(10).join(lines)}

{plot_note}

Caveats: one seed and tiny models, so differences of a few hundredths are within noise. The
upcycled MoE has more parameters and about twice the FFN compute per token (top-2 of copies)
and per-expert loops on CPU, so it is slower per step (see train time). Equal steps after
growth ignore the shallow model's pretraining; the equal-token and equal-compute lines do not.
The grown runs use two cosine cycles (pretraining, then a re-warm), `deep_long` one.

Exactness: upcycling is function-preserving at init with the renormalised router (the default,
`--router softmax_topk_renorm`, Mixtral style). With `--router softmax_topk` (Switch / T5X
style, weights not renormalised) it is not: each MoE layer computes the dense MLP times the
per-token factor scale x (sum of the chosen experts' probabilities) / G, which is 1 only at a
uniform router. w2 is scaled so that a uniform router is exact, and `perennial grow upcycle`
(and mid-run `grow.kind=upcycle`) prints one line with the factor's range and its largest
deviation from 1 over the new routers and 1024 random unit-RMS probe tokens (on the tests' tiny
model: factor in [1.005, 1.273] for 4 experts top-2, max logit difference 1.2e-3).
"""
    (report_dir / DOC_NAME).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 60 s)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "growth")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="default: docs/ for the full run, --out-dir with --quick")  # fmt: skip
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_dir = (args.report_dir or (out if args.quick else REPO / "docs")).resolve()
    cache = out / "cache"
    start = time.perf_counter()
    times = {"shallow": train(job(scale, out / "shallow", cache, scale.pretrain_steps,
                                  scale.n_layers))}  # fmt: skip
    grow(scale, out)
    for name, config in grown_jobs(scale, out, cache).items():
        times[name] = train(config)
    if not args.quick:
        times["deep_long"] = train(deep_long_job(scale, out, cache))
    curves = {name: eval_curve(out / name) for name in times if name != "shallow"}
    runtime = f"Wall time {time.perf_counter() - start:.0f} s in total on {os.cpu_count()} cores."
    params = {name: param_counts(out / name) for name in RUNS}
    table = results_table({name: curves[name] for name in RUNS}, times, params)
    lines = verdicts(curves, scale.pretrain_steps)
    write_report(report_dir, scale_name, scale, table, lines, runtime)
    plot(curves, report_dir / PLOT_NAME, scale.pretrain_steps)
    print(table)
    print(f"report: {report_dir / DOC_NAME}; {runtime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
