"""Continual pretraining experiment: a small CPU version of Ibrahim et al. (2024), "Simple and
Scalable Strategies to Continually Pre-train LLMs".

A tiny Llama is pretrained on domain A (English prose, `stdlib:prose`), then continued on domain
B (Python source, `stdlib:code`) four ways, each for the same number of steps and tokens:

  no_rewarm      keep training at the LR the cosine pretraining ended at (constant)
  rewarm         warm up again from that final LR to the peak, cosine back down to min_lr
  rewarm_replay  as rewarm, with 25% of the tokens replayed from A (a strong shift)
  infinite       pretrained with warmup -> cooldown -> constant plateau; continue on B at the
                 plateau and anneal to min_lr over the last 20% of the continued steps

Every run evaluates the held-out loss on both A and B (the absent domain has weight 0).
Continuations warm-start with `init.from` and keep the pretraining's AdamW state
(`init.load_optimizer=true`); the schedule is the continuation's own (`init.load_schedule=false`).

    python scripts/continual_experiment.py            # ~15-20 min on 2 CPU cores, writes docs/
    python scripts/continual_experiment.py --quick    # ~3 min smoke run, report in runs/continual
    python scripts/continual_experiment.py --tiny --out-dir /tmp/x   # seconds per run, for tests
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.report import machine_facts, replace_section  # noqa: E402
from trainer.schedule import build_schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC_NAME = "continual_experiment.md"
PLOT_NAME = "continual_experiment.png"
SECTION = "continual-results"

DOMAIN_A, DOMAIN_B = "prose", "code"
CORPORA = {DOMAIN_A: "stdlib:prose", DOMAIN_B: "stdlib:code"}
PEAK_LR = 3e-3
MIN_LR = PEAK_LR / 10  # Ibrahim et al. decay to 0.1 x the peak
PLATEAU_LR = PEAK_LR / 3
REPLAY_SHARE = 0.25
COOLDOWN_FRACTION = 0.4  # of the infinite pretraining, after warmup
ANNEAL_FRACTION = 0.2  # of the infinite continuation
WARMUP_FRACTION = 0.05  # of each phase that warms up

VARIANTS = ("no_rewarm", "rewarm", "rewarm_replay", "infinite")
LABELS = {
    "no_rewarm": "(a) no re-warm (constant final LR)",
    "rewarm": "(b) re-warm + re-decay",
    "rewarm_replay": f"(c) re-warm + re-decay + {REPLAY_SHARE:.0%} replay",
    "infinite": "(d) infinite (plateau, anneal at end)",
}
PRETRAIN_OF = {"no_rewarm": "pretrain_cosine", "rewarm": "pretrain_cosine",
               "rewarm_replay": "pretrain_cosine", "infinite": "pretrain_infinite"}


@dataclass(frozen=True)
class Scale:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    batch: int
    pretrain_steps: int
    continue_steps: int
    eval_interval: int
    eval_batches: int
    log_interval: int

    def warmup(self, steps: int) -> int:
        return max(1, round(steps * WARMUP_FRACTION))


SCALES = {
    "full": Scale(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=128, batch=16,
                  pretrain_steps=600, continue_steps=400, eval_interval=25, eval_batches=8,
                  log_interval=5),
    "quick": Scale(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=128, batch=16,
                   pretrain_steps=150, continue_steps=100, eval_interval=20, eval_batches=4,
                   log_interval=5),
    "tiny": Scale(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=32, batch=4,
                  pretrain_steps=8, continue_steps=6, eval_interval=3, eval_batches=1,
                  log_interval=1),
}


# -- job construction (pure) ------------------------------------------------------------------
def sources(prose_weight: float) -> list[dict]:
    """Both domains in every phase, so both are evaluated; weight 0 = evaluation only."""
    weights = {DOMAIN_A: prose_weight, DOMAIN_B: 1.0 - prose_weight}
    return [{"name": name, "path": CORPORA[name], "weight": weights[name]} for name in CORPORA]


def base_job(scale: Scale, run_dir: Path, cache_dir: Path, steps: int) -> dict:
    return {
        "run": {"dir": str(run_dir)},
        "model": {"dim": scale.dim, "n_layers": scale.n_layers, "n_heads": scale.n_heads,
                  "n_kv_heads": scale.n_kv_heads},
        "data": {"seq_len": scale.seq_len, "cache_dir": str(cache_dir),
                 "eval_batches": scale.eval_batches},
        "train": {"max_steps": steps, "global_batch_size": scale.batch,
                  "micro_batch_size": scale.batch, "log_interval": scale.log_interval},
        "optim": {"lr": PEAK_LR},
        "eval": {"interval": scale.eval_interval},
        "log": {"progress": False},
        "checkpoint": {"persist_interval": steps, "keep": 1},
    }


def pretrain_jobs(scale: Scale, out_dir: Path, cache_dir: Path) -> dict[str, dict]:
    steps, warmup = scale.pretrain_steps, scale.warmup(scale.pretrain_steps)
    cosine = {"name": "cosine", "warmup_steps": warmup, "total_steps": steps, "min_lr": MIN_LR}
    infinite = {"name": "infinite", "warmup_steps": warmup, "total_steps": steps,
                "cooldown_steps": max(1, round(steps * COOLDOWN_FRACTION)),
                "cooldown_shape": "cosine", "plateau_lr": PLATEAU_LR, "anneal_steps": 0}
    jobs = {}
    for name, schedule in (("pretrain_cosine", cosine), ("pretrain_infinite", infinite)):
        job = base_job(scale, out_dir / name, cache_dir, steps)
        job["eval"]["interval"] = scale.eval_interval * 4  # only its last eval is reported
        job["data"]["sources"] = sources(prose_weight=1.0)
        job["schedule"] = schedule
        jobs[name] = job
    return jobs


def final_lr(job: Mapping) -> float:
    """The LR a job's schedule ends at."""
    return build_schedule(dict(job["schedule"]), job["optim"]["lr"]).final_lr


def continuation_schedule(variant: str, scale: Scale, pretrain: Mapping) -> tuple[dict, float]:
    """(schedule, optim.lr) of one continuation; `pretrain` is the job it starts from."""
    steps, end_lr = scale.continue_steps, final_lr(pretrain)
    if variant == "no_rewarm":
        return {"name": "constant", "warmup_steps": 0, "total_steps": steps}, end_lr
    if variant in ("rewarm", "rewarm_replay"):
        return {"name": "cosine", "warmup_steps": scale.warmup(steps), "total_steps": steps,
                "init_lr": end_lr, "min_lr": MIN_LR}, PEAK_LR
    if variant == "infinite":
        if pretrain["schedule"]["name"] != "infinite":
            raise ValueError(f"variant 'infinite' needs an infinite pretraining, got "
                             f"{pretrain['schedule']['name']!r}")
        # The plateau continues as is: no warmup, no cooldown, only the final anneal.
        return {"name": "infinite", "warmup_steps": 0, "total_steps": steps, "cooldown_steps": 0,
                "plateau_lr": end_lr, "anneal_steps": max(1, round(steps * ANNEAL_FRACTION)),
                "decay_shape": "cosine", "min_lr": MIN_LR}, PEAK_LR
    raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")


def continuation_jobs(scale: Scale, out_dir: Path, cache_dir: Path,
                      pretrains: Mapping[str, Mapping]) -> dict[str, dict]:
    jobs = {}
    for variant in VARIANTS:
        pretrain = pretrains[PRETRAIN_OF[variant]]
        job = base_job(scale, out_dir / variant, cache_dir, scale.continue_steps)
        replay = REPLAY_SHARE if variant == "rewarm_replay" else 0.0
        job["data"]["sources"] = sources(prose_weight=replay)
        job["schedule"], job["optim"]["lr"] = continuation_schedule(variant, scale, pretrain)
        job["init"] = {"from": pretrain["run"]["dir"], "load_optimizer": True,
                       "load_schedule": False}
        job["checkpoint"] = {"enabled": False}
        jobs[variant] = job
    check_equal_compute(jobs)
    return jobs


def check_equal_compute(jobs: Mapping[str, Mapping]) -> None:
    """Every continuation must train the same steps x sequences x tokens."""
    shapes = {name: (job["train"]["max_steps"], job["train"]["global_batch_size"],
                     job["data"]["seq_len"]) for name, job in jobs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"continuations differ in compute (steps, batch, seq_len): {shapes}")


# -- running ----------------------------------------------------------------------------------
def train(job: Mapping, threads: int) -> float:
    """Trains one job from scratch (its run dir is wiped); returns the wall time in seconds."""
    run_dir = Path(job["run"]["dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    config = run_dir.with_name(run_dir.name + ".yaml")
    OmegaConf.save(OmegaConf.create(dict(job)), config)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": str(threads)}
    log = run_dir.with_name(run_dir.name + ".log")
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "launch.cli", "train", str(config)],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"training {run_dir.name} failed (exit {code}); {log}:\n{tail}")
    elapsed = time.perf_counter() - start
    print(f"  {run_dir.name}: {elapsed:.0f} s", flush=True)
    return elapsed


def train_all(jobs: Mapping[str, Mapping], parallel: int) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {name: pool.submit(train, job, threads) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


# -- results (pure) ---------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@dataclass
class VariantResult:
    pretrain_end: dict[str, float]
    """Held-out loss per domain at the end of the pretraining this variant continues."""
    evals: dict[int, dict[str, float]]
    """Continued step -> held-out loss per domain; step 0 is the pretraining's last eval."""
    lrs: dict[int, float]
    tokens_by_source: dict[str, int]

    def loss_at(self, domain: str, step: int) -> float:
        return self.evals[step][domain]

    @property
    def final_step(self) -> int:
        return max(self.evals)


def summarize(pretrain: Sequence[Mapping], continued: Sequence[Mapping]) -> VariantResult:
    pretrain_evals = [r["eval_loss"] for r in pretrain if "eval_loss" in r]
    if not pretrain_evals or not continued:
        raise ValueError("metrics lack a pretraining eval or continued steps")
    evals = {0: pretrain_evals[-1]}
    evals.update({r["step"]: r["eval_loss"] for r in continued if "eval_loss" in r})
    return VariantResult(
        pretrain_end=pretrain_evals[-1],
        evals=evals,
        lrs={r["step"]: r["lr"] for r in continued},
        tokens_by_source=continued[-1]["tokens_by_source"],
    )


def equal_steps(results: Mapping[str, VariantResult]) -> list[int]:
    """A few continued steps at which every variant was evaluated: about 1/4, 1/2 and the end."""
    common = sorted(set.intersection(*(set(r.evals) - {0} for r in results.values())))
    if not common:
        raise ValueError("the variants share no evaluated step")
    picks = [common[min(len(common) - 1, round(len(common) * q) - 1)] for q in (0.25, 0.5, 1.0)]
    return sorted(set(picks))


def results_table(results: Mapping[str, VariantResult]) -> str:
    steps = equal_steps(results)
    header = (["variant", "A loss end of pretrain", "A loss final", "forgetting (ΔA)"]
              + [f"B loss @ {s}" for s in steps] + ["B share of tokens"])
    rows = [header, ["---"] * len(header)]
    for variant, r in results.items():
        a_final = r.loss_at(DOMAIN_A, r.final_step)
        a_start = r.pretrain_end[DOMAIN_A]
        b_share = r.tokens_by_source[DOMAIN_B] / max(1, sum(r.tokens_by_source.values()))
        rows.append([LABELS.get(variant, variant), f"{a_start:.3f}", f"{a_final:.3f}",
                     f"{a_final - a_start:+.3f}"]
                    + [f"{r.loss_at(DOMAIN_B, s):.3f}" for s in steps] + [f"{b_share:.0%}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(results: Mapping[str, VariantResult], out_png: Path) -> None:
    from matplotlib.figure import Figure  # lazy: no GUI backend, no pyplot global state

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_a, ax_b, ax_lr = fig.subplots(1, 3)
    for variant, r in results.items():
        steps = sorted(r.evals)
        label = LABELS.get(variant, variant)
        ax_a.plot(steps, [r.loss_at(DOMAIN_A, s) for s in steps], marker=".", label=label)
        ax_b.plot(steps, [r.loss_at(DOMAIN_B, s) for s in steps], marker=".", label=label)
        lr_steps = sorted(r.lrs)
        ax_lr.plot(lr_steps, [r.lrs[s] for s in lr_steps], label=label)
    ax_a.set(title=f"held-out loss on A ({DOMAIN_A}): forgetting", ylabel="loss (nats/byte)")
    ax_b.set(title=f"held-out loss on B ({DOMAIN_B}): adaptation", ylabel="loss (nats/byte)")
    ax_lr.set(title="learning rate", ylabel="LR")
    for ax in (ax_a, ax_b, ax_lr):
        ax.set_xlabel("continued step (0 = end of pretraining)")
        ax.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    fig.savefig(os.fspath(out_png), dpi=110)


def setup_text(scale_name: str, scale: Scale, jobs: Mapping[str, Mapping]) -> str:
    tokens = scale.batch * scale.seq_len
    lines = [
        f"- Scale `{scale_name}`: Llama dim {scale.dim}, {scale.n_layers} layers, "
        f"{scale.n_heads} heads ({scale.n_kv_heads} KV), byte tokenizer, seq_len "
        f"{scale.seq_len}, batch {scale.batch} ({tokens} tokens/step), AdamW peak LR "
        f"{PEAK_LR:g}, min LR {MIN_LR:g}.",
        f"- Pretraining: {scale.pretrain_steps} steps on A = `{CORPORA[DOMAIN_A]}`; "
        f"continuation: {scale.continue_steps} steps "
        f"({scale.continue_steps * tokens:,} tokens) per variant on B = `{CORPORA[DOMAIN_B]}`. "
        f"Held-out loss on both every {scale.eval_interval} steps "
        f"({scale.eval_batches * scale.batch} sequences per domain).",
        "- Continuations: `init.from=<pretraining run>`, `init.load_optimizer=true` (AdamW "
        "moments kept), `init.load_schedule=false` (each continuation has its own schedule).",
        "",
        "| run | schedule | optim.lr | sources (weight) |",
        "| --- | --- | --- | --- |",
    ]
    for name, job in jobs.items():
        schedule = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in job["schedule"].items() if k != "total_steps")
        mix = ", ".join(f"{s['name']} {s['weight']:g}" for s in job["data"]["sources"])
        lines.append(f"| {name} | {schedule} | {job['optim']['lr']:g} | {mix} |")
    return "\n".join(lines)


def write_report(report_dir: Path, results: Mapping[str, VariantResult], setup: str,
                 runtime: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    plot(results, report_dir / PLOT_NAME)
    body = "\n\n".join([
        "## Setup", setup,
        "## Results", results_table(results),
        "A = prose (forgetting), B = code (adaptation); losses in nats per byte on held-out "
        "data. Forgetting = A loss at the end of the continuation minus A loss at the end of "
        "the pretraining it started from.",
        f"![loss on A and B over continued steps, and the LR]({PLOT_NAME})",
        f"Runtime: {runtime}. Machine: {machine_facts()}.",
    ])
    doc = report_dir / DOC_NAME
    if not doc.exists():
        doc.write_text("# Continual pretraining experiment\n\n"
                       "Generated by `python scripts/continual_experiment.py`.\n")
    replace_section(SECTION, body, path=doc)


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="~3-minute smoke version")
    size.add_argument("--tiny", action="store_true", help="seconds per run, for tests")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "continual")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where the .md and .png go (default: docs/ for the full run, "
                             "--out-dir otherwise)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="data.cache_dir shared by all runs (default: <out-dir>/cache)")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained at once")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scale_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = (args.cache_dir or out_dir / "cache").resolve()
    default_report = REPO / "docs" if scale_name == "full" else out_dir
    report_dir = (args.report_dir or default_report).resolve()

    start = time.perf_counter()
    pretrains = pretrain_jobs(scale, out_dir, cache_dir)
    continuations = continuation_jobs(scale, out_dir, cache_dir, pretrains)
    # Corpora are built once, under a file lock, by whichever run gets there first.
    times = train_all(pretrains, args.parallel)
    times |= train_all(continuations, args.parallel)
    elapsed = time.perf_counter() - start

    results = {variant: summarize(read_metrics(out_dir / PRETRAIN_OF[variant]),
                                  read_metrics(out_dir / variant)) for variant in VARIANTS}
    runtime = (f"{elapsed / 60:.1f} min wall in total ("
               + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items())
               + f"; continuations {args.parallel} at a time)")
    write_report(report_dir, results, setup_text(scale_name, scale, pretrains | continuations),
                 runtime)
    print(results_table(results))
    print(f"report: {report_dir / DOC_NAME}, {report_dir / PLOT_NAME}; {runtime}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
