"""`perennial slurm`: write (and with --submit, submit) an sbatch script for a training job.

    perennial slurm CONFIG [key=value ...] --nodes N --gpus-per-node G [--partition P]
        [--time T] [--account A] [--cpus-per-task C] [--nproc-per-node P] [--submit]

The script asks for N nodes with one task each; that task is our launcher (`perennial train`,
i.e. torchrun with a c10d rendezvous on the first node), which starts G workers per node.
`--signal=TERM@120 --requeue`: two minutes before the time limit the launchers get SIGTERM, the
workers save, and the script requeues the job; a requeued job runs the same script and resumes
from the newest checkpoint on its own. A job the scheduler preempts or an admin requeues
(`scontrol requeue`) restarts the same way. On several nodes every keeper listens on
--rdzv-port + 1 and, with `checkpoint.replicas=1`, replicates to the next node of the job's
node list (`--keeper-peer slurm`).

With --gpus-per-node 0 the job runs on CPUs: --nproc-per-node workers per node (default 1),
each with one CPU unless --cpus-per-task says otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from launch.preflight import check_run_dir_writable, check_world_size
from trainer.args import parse_job_args
from trainer.config_loader import load_config
from trainer.health import validate_hang_timeout

SIGNAL_LEAD_S = 120
DEFAULT_RDZV_PORT = 29500
# What the launcher exits with when SIGTERM stopped it: 128 + 15 (killed by the signal).
REQUEUE_EXIT_CODES = (143,)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, required=True, help="nodes (one launcher each)")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; 0 = CPU")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="workers per node")
    parser.add_argument("--partition", default="", help="Slurm partition")
    parser.add_argument("--time", default="", help="time limit, e.g. 24:00:00")
    parser.add_argument("--account", default="", help="Slurm account")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="CPUs for each node's task")
    parser.add_argument("--job-name", default="", help="job name (default: run.name)")
    parser.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts per run")
    parser.add_argument("--rdzv-port", type=int, default=DEFAULT_RDZV_PORT, help="c10d port")
    parser.add_argument("--submit", action="store_true", help="submit with sbatch")


def slurm_command(argv: list[str]) -> int:
    args = parse_job_args(argv, prog="perennial slurm", add_flags=_add_flags)
    flags = args.flags
    nproc = workers_per_node(flags.gpus_per_node, flags.nproc_per_node)
    if flags.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {flags.nodes}")
    validate_time(flags.time)
    cfg = load_config(args.config, args.overrides)
    validate_hang_timeout(cfg.train.hang_timeout_s)
    check_world_size(cfg, nproc, flags.nodes)
    check_run_dir_writable(cfg.run.dir)
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    config = str(Path(args.config).resolve()) if args.config else None
    script = render_sbatch(flags, nproc, run_dir, config, args.overrides, job_name(flags, cfg))
    path = run_dir / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}")
    if flags.submit:
        print(f"submitted job {submit(path)}")
    return 0


def workers_per_node(gpus_per_node: int, nproc_per_node: int) -> int:
    if gpus_per_node < 0 or nproc_per_node < 0:
        raise ValueError("--gpus-per-node and --nproc-per-node must be >= 0")
    if gpus_per_node == 0:
        return nproc_per_node or 1
    if nproc_per_node and nproc_per_node != gpus_per_node:
        raise ValueError(
            f"--nproc-per-node ({nproc_per_node}) must equal --gpus-per-node "
            f"({gpus_per_node}): one worker per GPU"
        )
    return gpus_per_node


# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, and UNLIMITED/INFINITE.
TIME_FORMAT = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)")


def validate_time(time_limit: str) -> None:
    if time_limit and not TIME_FORMAT.fullmatch(time_limit.upper()):
        raise ValueError(
            f"--time {time_limit!r} is not a Slurm time limit (MINUTES, HH:MM:SS or "
            f"DAYS-HH:MM:SS)"
        )


def job_name(flags, cfg) -> str:
    return flags.job_name or cfg.run.name or "perennial"


def render_sbatch(
    flags, nproc: int, run_dir: Path, config: str | None, overrides: list[str], name: str
) -> str:
    cpus = flags.cpus_per_task or (nproc if flags.gpus_per_node == 0 else 0)
    lines = ["#!/bin/bash", f"# Written by `perennial slurm` on {datetime.now():%Y-%m-%d %H:%M}."]
    lines += [f"#SBATCH {option}" for option in sbatch_options(flags, cpus, run_dir, name)]
    lines += ["", *job_body(flags, nproc, cpus, config, overrides), ""]
    return "\n".join(lines)


def sbatch_options(flags, cpus: int, run_dir: Path, name: str) -> list[str]:
    options = [
        f"--job-name={name}",
        f"--nodes={flags.nodes}",
        "--ntasks-per-node=1",
    ]
    if flags.gpus_per_node:
        options.append(f"--gpus-per-node={flags.gpus_per_node}")
    if cpus:
        options.append(f"--cpus-per-task={cpus}")
    for option in ("partition", "time", "account"):
        if getattr(flags, option):
            options.append(f"--{option}={getattr(flags, option)}")
    options += [
        f"--signal=TERM@{SIGNAL_LEAD_S}",
        "--requeue",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        f"--output={run_dir}/slurm/%j.out",
        f"--error={run_dir}/slurm/%j.err",
    ]
    return options


def job_body(flags, nproc: int, cpus: int, config: str | None, overrides: list[str]) -> list[str]:
    train = [sys.executable, "-m", "launch.cli", "train"]
    train += ([config] if config else []) + list(overrides)
    train += ["--nproc", str(nproc), "--nnodes", str(flags.nodes)]
    train += ["--max-restarts", str(flags.max_restarts)]
    if flags.nodes > 1:  # each node's keeper replicates to the next node's (checkpoint.replicas=1)
        train += ["--keeper-port", str(flags.rdzv_port + 1), "--keeper-peer", "slurm"]
    srun = ["srun", "--kill-on-bad-exit=1"] + ([f"--cpus-per-task={cpus}"] if cpus else [])
    launch = " ".join(shlex.quote(part) for part in srun + train)
    requeue_test = " || ".join(f"$code -eq {code}" for code in requeue_exit_codes())
    return [
        "# The first node hosts the c10d rendezvous; every node's launcher joins it.",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        'echo "perennial: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})'
        f' on $SLURM_JOB_NODELIST, rendezvous $HEAD:{flags.rdzv_port}"',
        f'{launch} --rdzv-endpoint "$HEAD:{flags.rdzv_port}"',
        "code=$?",
        "# Stopped by the time-limit signal: requeue; the next run resumes from the checkpoint.",
        f"if [[ {requeue_test} ]]; then",
        '    echo "perennial: stopped by SIGTERM (exit $code); requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $code",
    ]


def requeue_exit_codes() -> tuple[int, ...]:
    """143, and the launcher's own code for "stopped by SIGTERM, saved" if it defines one."""
    from launch import train_command

    own = getattr(train_command, "REQUEUE_EXIT_CODE", None)
    return REQUEUE_EXIT_CODES + ((own,) if own and own not in REQUEUE_EXIT_CODES else ())


def submit(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise ValueError(f"sbatch is not on PATH (not a Slurm login node?); {script} is written")
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=os.environ
    )
    if proc.returncode != 0:
        raise ValueError(f"sbatch rejected {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
