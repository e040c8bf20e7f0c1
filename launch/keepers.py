"""Start, supervise and stop this node's snapshot keeper(s) around the training workers.

One keeper per node, started before torchrun and stopped after it (SIGTERM: it persists the
newest snapshot newer than the disk's, then unlinks its shared memory). `--simulated-nodes K`
runs K keepers on this machine, each owning 1/K of the local ranks, so tests can lose a "node".
A keeper that dies while training runs is restarted; it adopts the slots its predecessor left
or, when they are gone with the node, fetches them back from its peer's replica.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from checkpointing.snapshot.keeper import KEEPER_PID_FILE
from trainer.distributed import free_port
from trainer.lifetime import preexec_die_with
from trainer.run_identity import read_run_id

SHM_BASE = Path(os.environ.get("PERENNIAL_SHM_BASE", "/dev/shm/perennial"))
"""Where keepers keep their memory unless `perennial train --shm-dir DIR` says otherwise."""
STOP_TIMEOUT_S = 60.0


def job_id(run_dir: str) -> str:
    """Stable across restarts and requeues of the same run directory path."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def shm_root_for(run_dir: str | os.PathLike, run_id: str | None = None,
                 shm_dir: Path | None = None) -> Path:
    """The memory tier's location under `shm_dir` (default SHM_BASE): the run directory's
    path and its run id, so a directory deleted and recreated (a new run id) never finds the
    old run's memory."""
    run_id = run_id or read_run_id(run_dir) or "none"
    return (shm_dir or SHM_BASE) / f"{job_id(str(run_dir))}-{run_id}"


def check_shm_dir(value: str) -> Path:
    """`--shm-dir DIR`: an absolute directory this user can create and write in."""
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"--shm-dir must be an absolute path, got {value!r}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--shm-dir {value}: cannot create it ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--shm-dir {value}: not writable by this user")
    return path


def remove_other_runs_memory(run_dir: str | os.PathLike, run_id: str,
                             shm_dir: Path | None = None) -> list[Path]:
    """Delete memory that earlier runs in this directory path left after a whole-job kill
    (another run id, no live keeper). Returns what was removed."""
    removed = []
    base = shm_dir or SHM_BASE
    mine = shm_root_for(run_dir, run_id, base)
    for path in sorted(base.glob(f"{job_id(str(run_dir))}*")) if base.is_dir() else []:
        if path != mine and path.is_dir() and not keeper_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def keeper_alive(shm_root: Path) -> bool:
    for pid_file in shm_root.glob(f"node*/{KEEPER_PID_FILE}"):
        try:
            os.kill(int(pid_file.read_text()), 0)
            return True
        except (OSError, ValueError):
            continue
    return False


class KeeperGroup:
    def __init__(self, cfg, nproc: int, flags, run_id: str) -> None:
        simulated = flags.simulated_nodes
        if simulated < 1 or nproc % simulated:
            raise ValueError(f"--simulated-nodes {simulated} must divide --nproc {nproc}")
        self.run_id = run_id
        self.shm_root = shm_root_for(cfg.run.dir, run_id, flags.shm_dir)
        self.node_index = flags.node_rank
        num_nodes = max(simulated, int(flags.nnodes.split(":")[0]))
        if simulated == 1 and flags.keeper_port:
            self.ports = [flags.keeper_port]
        else:
            self.ports = [free_port() for _ in range(simulated)]
        self.commands = []
        # Only keepers that replicate across real nodes are reached from other hosts.
        cross_node = bool(cfg.checkpoint.replicas and flags.keeper_peer and simulated == 1)
        node_peer = resolve_keeper_peer(flags.keeper_peer, flags.keeper_port) if cross_node else ""
        for i, port in enumerate(self.ports):
            peer = f"127.0.0.1:{self.ports[(i + 1) % simulated]}" if simulated > 1 else node_peer
            cmd = [sys.executable, "-m", "checkpointing.snapshot.keeper",
                   "--shm-root", str(self.shm_root), "--node-index", str(self.node_index + i),
                   "--num-nodes", str(num_nodes), "--port", str(port),
                   "--local-ranks", str(nproc // simulated), "--checkpoint-dir",
                   cfg.checkpoint.dir, "--keep", str(cfg.checkpoint.keep), "--run-id", run_id]
            if cfg.checkpoint.replicas and peer:
                cmd += ["--peer", peer]
            cmd += ["--bind", "0.0.0.0" if cross_node else "127.0.0.1"]
            self.commands.append(cmd)
        self.procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        return {
            "PERENNIAL_SHM_ROOT": str(self.shm_root),
            "PERENNIAL_KEEPERS": ",".join(f"127.0.0.1:{p}" for p in self.ports),
            "PERENNIAL_NODE_INDEX": str(self.node_index),
            "PERENNIAL_RUN_ID": self.run_id,
        }

    def _spawn(self, index: int) -> subprocess.Popen:
        """A keeper that gets SIGTERM when this launcher dies (it persists, then frees memory)."""
        return subprocess.Popen(self.commands[index],
                                preexec_fn=preexec_die_with(os.getpid(), signal.SIGTERM))

    def start(self) -> None:
        self.procs = [self._spawn(i) for i in range(len(self.commands))]
        for port in self.ports:
            _wait_listening(port)
        self._watcher = threading.Thread(target=self._restart_dead, daemon=True)
        self._watcher.start()

    def _restart_dead(self) -> None:
        while not self._stopping.wait(0.2):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    print(f"keeper of node {self.node_index + i} exited ({proc.returncode}); "
                          "restarting it", file=sys.stderr, flush=True)
                    self.procs[i] = self._spawn(i)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"keeper on port {port} did not start") from None
            time.sleep(0.05)


def resolve_keeper_peer(peer: str, port: int) -> str:
    """`host:port` as given, or for `slurm` the next node of this Slurm job's node list (a ring,
    so every node's snapshot lives on one other node) at the same keeper port."""
    if peer != "slurm":
        return peer
    nodelist, node_id = os.environ.get("SLURM_JOB_NODELIST"), os.environ.get("SLURM_NODEID")
    if not nodelist or node_id is None:
        raise ValueError("--keeper-peer slurm needs a Slurm job step ($SLURM_JOB_NODELIST and "
                         "$SLURM_NODEID are not set)")
    if not port:
        raise ValueError("--keeper-peer slurm needs a fixed --keeper-port (the same on every node)")
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                          text=True)
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise ValueError(f"scontrol cannot expand SLURM_JOB_NODELIST={nodelist!r}: "
                         f"{proc.stderr.strip() or 'no hosts'}")
    return f"{hosts[(int(node_id) + 1) % len(hosts)]}:{port}"
