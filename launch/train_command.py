"""`perennial train`: validate, then train in this process or under torchrun."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from launch.keepers import SHM_BASE, KeeperGroup, check_shm_dir, remove_other_runs_memory
from launch.preflight import preflight
from launch.torchrun import ENV_VERBOSE
from trainer.args import parse_job_args
from trainer.config_loader import ENV_CONFIG_NOTED, load_config, to_yaml, validate_layout
from trainer.lifetime import preexec_die_with
from trainer.run_identity import ensure_run_id
from trainer.run_lock import ENV_FRESH, ENV_LOCK_HELD, lock_unless_held

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as trainer/snapshots.py exits


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, help="worker processes on this node")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts on failure")
    parser.add_argument("--nnodes", default="1", help="nodes (torchrun syntax, e.g. 2 or 1:4)")
    parser.add_argument("--rdzv-endpoint", default="", help="host:port of the c10d rendezvous")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="keep torchrun's own logs and failure report")
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", 0)),
                        help="this node's index among --nnodes (default $SLURM_NODEID or 0)")
    parser.add_argument("--keeper-port", type=int, default=0,
                        help="snapshot keeper port (fixed on multi-node jobs; 0 = any free)")
    parser.add_argument("--keeper-peer", default="",
                        help="host:port of the next node's keeper (checkpoint.replicas=1), or "
                             "'slurm': the next node of $SLURM_JOB_NODELIST at --keeper-port")
    parser.add_argument("--shm-dir", default=str(SHM_BASE),
                        help="where this node's keeper keeps the memory snapshots (a tmpfs; "
                             "default %(default)s)")
    parser.add_argument("--rdzv-conf", default="",
                        help="torchrun's rendezvous settings, e.g. last_call_timeout=5 (how long "
                             "an elastic --nnodes MIN:MAX rendezvous waits for more nodes)")
    # For tests, out of the help: K keepers here, each owning nproc/K ranks.
    parser.add_argument("--simulated-nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true",
                        help="start from scratch when the run's memory or disk state cannot be "
                             "used (without it such a run stops and says why)")


def train_command(argv: list[str]) -> int:
    # The job talks to its workers through the environment; called in-process (tests, the
    # in-process single worker) it must not leak into whatever the caller runs next.
    saved = os.environ.copy()
    try:
        return _train(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _train(argv: list[str]) -> int:
    args = parse_job_args(argv, prog="perennial train", add_flags=_add_flags)
    flags = args.flags
    if flags.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {flags.nproc}")
    flags.shm_dir = check_shm_dir(flags.shm_dir)
    cfg = load_config(args.config, args.overrides)
    os.environ[ENV_CONFIG_NOTED] = "1"  # its warnings are printed: the workers stay quiet
    validate_layout(cfg, flags.nproc * _min_nodes(flags.nnodes))
    cores = len(os.sched_getaffinity(0))
    if flags.nproc > cores:
        print(f"warning: --nproc {flags.nproc} exceeds the {cores} CPU cores this process may "
              "use; the workers will compete for them", file=sys.stderr)
    if flags.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    # Node 0 hosts the rendezvous store; others (a simulated node on the same host, a node
    # joining later) find its port taken by design.
    endpoint = flags.rdzv_endpoint if flags.node_rank == 0 else ""
    preflight(cfg, flags.nproc, _min_nodes(flags.nnodes), endpoint, flags.shm_dir)
    lock = lock_unless_held(cfg.run.dir, is_rank0=flags.node_rank == 0)
    os.environ[ENV_LOCK_HELD] = str(Path(cfg.run.dir).resolve())
    if flags.fresh:
        os.environ[ENV_FRESH] = "1"
    try:
        return _run_job(cfg, flags, args)
    finally:
        if lock is not None:
            lock.release()


def _run_job(cfg, flags, args) -> int:
    run_id = ensure_run_id(cfg.run.dir)
    for path in remove_other_runs_memory(cfg.run.dir, run_id, flags.shm_dir):
        print(f"removed memory snapshots another run left in {cfg.run.dir} ({path})",
              file=sys.stderr)
    keepers = KeeperGroup(cfg, flags.nproc, flags, run_id) if cfg.checkpoint.memory_snapshots() \
        else None
    if keepers is not None:
        keepers.start()
        os.environ.update(keepers.env())
    try:
        if flags.nproc == 1 and flags.nnodes == "1" and flags.max_restarts == 0:
            from trainer.__main__ import main as worker_main

            return worker_main(argv_for_worker(args))
        return _run_torchrun(flags, argv_for_worker(args))
    finally:
        if keepers is not None:
            keepers.stop()


def argv_for_worker(args) -> list[str]:
    return ([args.config] if args.config else []) + list(args.overrides)


def _min_nodes(nnodes: str) -> int:
    try:
        return int(nnodes.split(":")[0])
    except ValueError:
        raise ValueError(f"--nnodes must be N or MIN:MAX, got {nnodes!r}") from None


def torchrun_command(flags, worker_argv: list[str]) -> list[str]:
    # torchrun itself (torch.distributed.run), reporting a failed worker on one line
    cmd = [sys.executable, "-m", "launch.torchrun", "--nproc-per-node", str(flags.nproc)]
    cmd += ["--max-restarts", str(flags.max_restarts)]
    if flags.nnodes == "1" and not flags.rdzv_endpoint:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", flags.nnodes, "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", flags.rdzv_endpoint or "localhost:29500"]
        if flags.rdzv_conf:
            cmd += ["--rdzv-conf", flags.rdzv_conf]
    return cmd + ["-m", "trainer", *worker_argv]


# With the rendezvous TCPStore shared with the workers (torch's default), a restarted group
# can read its peers' addresses from the previous attempt and fail to connect (pytorch#135712);
# a store of its own per restart round avoids that.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _run_torchrun(flags, worker_argv: list[str]) -> int:
    env = {**os.environ, **TORCHRUN_ENV}
    if flags.verbose:
        env[ENV_VERBOSE] = "1"
    # torchrun dies with this launcher, and its workers with it (trainer/lifetime.py).
    proc = subprocess.Popen(torchrun_command(flags, worker_argv), env=env,
                            preexec_fn=preexec_die_with(os.getpid(), signal.SIGKILL))
    # Slurm preemption: torchrun passes SIGTERM on to the workers, which save and exit 143;
    # torchrun itself then ends with a traceback and code 1, so the launcher answers 143.
    terminated = []

    def forward(*_):
        terminated.append(True)
        proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        print(f"perennial: stopped by SIGTERM (exit code {PREEMPTED_EXIT_CODE}: requeue to "
              "resume from the final checkpoint)", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return code  # launch/torchrun.py has reported a failure on one line
