"""A node dies and the job goes on from the survivors' memory: one host stands in for several
nodes, each its own `perennial train --nnodes MIN:MAX --node-rank I` launcher with its own
keeper and its own --shm-dir (no node can read another's memory directory; what crosses nodes
goes over the keepers' TCP protocol). No disk checkpoint is committed before the kill."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.trainer.runs import REPO, losses, metrics, perennial, tiny_job
from tests.trainer.test_resume import assert_bitwise_equal, final_weights
from trainer.distributed import free_port

pytestmark = pytest.mark.slow
STEPS = 8
JOB = [f"train.max_steps={STEPS}", f"schedule.total_steps={STEPS}", "train.global_batch_size=8",
       "checkpoint.interval=1", "checkpoint.persist_interval=1000", "checkpoint.replicas=1"]


class Node:
    """One simulated node: a launcher (torchrun agent, workers, keeper) with its own memory."""

    def __init__(self, tmp: Path, index: int, nnodes: str, rdzv: int, keeper_ports: list[int],
                 cache: Path, nproc: int, *extra: str, last_call_s: int = 10) -> None:
        self.shm_dir = tmp / f"shm-node{index}"
        peer = keeper_ports[(index + 1) % len(keeper_ports)]
        args = [*tiny_job(tmp / "run", cache, *JOB, *extra), "--nproc", str(nproc),
                "--nnodes", nnodes, "--node-rank", str(index),
                "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
                # Node 0 hosts the rendezvous store (on one host every node would think it may).
                "--rdzv-conf", f"is_host={int(index == 0)},last_call_timeout={last_call_s},"
                "join_timeout=60",
                "--max-restarts", "3",
                "--keeper-port", str(keeper_ports[index]), "--keeper-peer",
                f"127.0.0.1:{peer}", "--shm-dir", str(self.shm_dir)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """The node goes down as a whole: launcher, torchrun, workers, keeper, its memory."""
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.proc.pid).children(recursive=True)
            for process in [psutil.Process(self.proc.pid), *tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    def finish(self, timeout: float = 240) -> str:
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        assert self.proc.returncode == 0, self.log
        return self.log


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.kill()


def start_nodes(tmp: Path, cache: Path, count: int, nproc: int, started: list,
                *extra: str, last_call_s: int = 10) -> list[Node]:
    rdzv, ports = free_port(), [free_port() for _ in range(count)]
    for index in range(count):  # at once: a rendezvous waits last_call_s for the missing ones
        started.append(Node(tmp, index, f"1:{count}", rdzv, ports, cache, nproc, *extra,
                            last_call_s=last_call_s))
        started[-1].ports = (rdzv, ports)
    # Rank 0 may be on any node (torchrun orders the nodes of a rendezvous by its own rule).
    logs = lambda: "".join(node.log for node in started)  # noqa: E731
    wait_for(lambda: "layout world_size=" in logs() or None, 120, started[0])
    assert f"layout world_size={count * nproc}," in logs(), f"not every node joined:\n{logs()}"
    return started


def wait_for(probe, timeout: float, node: Node):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := probe()) is not None:
            return found
        assert node.proc.poll() is None, f"node ended early:\n{node.log}"
        time.sleep(0.05)
    raise AssertionError(f"timed out; node 0 log:\n{node.log}")


def resumes(log: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2)))
            for m in re.finditer(r"resumed from (\S+) \(step (\d+)\)", log)]


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    records = metrics(run_dir) if path.exists() else []
    return max((r["step"] for r in records if "loss" in r), default=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_cache) -> Path:
    """The data cache prepared once, so no node's launcher waits for another's preparation."""
    run_dir = tmp_path_factory.mktemp("prepare")
    perennial("train", *tiny_job(run_dir, data_cache, "train.max_steps=1"))
    return data_cache


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, prepared) -> Path:
    run_dir = tmp_path_factory.mktemp("four-ranks")
    perennial("train", *tiny_job(run_dir, prepared, *JOB[:3]), "--nproc", "4")
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(four_ranks) -> dict[int, float]:
    return losses(metrics(four_ranks))


def test_node_lost_job_goes_on_from_peer_memory(tmp_path, prepared, nodes, uninterrupted):
    node0, node1 = start_nodes(tmp_path, prepared, 2, 2, nodes)
    run_dir = tmp_path / "run"
    wait_for(lambda: logged_step(run_dir) >= 3 or None, 180, node0)
    assert not list((run_dir / "checkpoints").glob("step-*")), "only memory may serve"
    reached = logged_step(run_dir)
    node1.kill()
    log = node0.finish()
    resumed = resumes(log)
    assert len(resumed) == 1 and resumed[0][0].startswith("memory:"), log
    step = resumed[0][1]
    assert step >= reached - 1, f"resumed at {step} after step {reached} was logged:\n{log}"
    records = metrics(run_dir)
    assert max(r["step"] for r in records if "loss" in r) == STEPS
    after = {s: v for s, v in losses(records).items() if s > step}  # the last of each step
    for s, loss in after.items():
        assert abs(loss - uninterrupted[s]) <= 1e-3 * abs(uninterrupted[s]), (s, loss, log)
    assert not any(node0.shm_dir.iterdir()), "node 0 left shared memory behind"


def test_two_neighbours_lost_restore_names_missing_boxes_and_uses_disk(tmp_path, prepared,
                                                                       nodes):
    """A ring of replicas (node i's on node i+1) survives one loss, not two neighbours: with
    nodes 1 and 2 gone, rank 1's slots have no copy left (node 2 held them)."""
    node0, node1, node2 = start_nodes(tmp_path, prepared, 3, 1, nodes,
                                      "checkpoint.persist_interval=3", "train.global_batch_size=12")
    run_dir = tmp_path / "run"
    wait_for(lambda: logged_step(run_dir) >= 5 or None, 180, node0)
    node1.kill()
    node2.kill()
    log = node0.finish()
    skipped = re.findall(r"skipping memory snapshot (\d+): no surviving keeper holds a complete "
                         r"copy of the slots of rank\(s\) \[(\d+)\] of 3; boxes of (\d+) tensor",
                         log)
    (source, step), = resumes(log)
    assert source.endswith(f"step-{step:08d}") and step % 3 == 0, log  # the disk checkpoint
    assert skipped and all(int(s) >= step for s, _, _ in skipped), log
    assert all(int(count) > 0 for _, _, count in skipped), log
    assert max(r["step"] for r in metrics(run_dir) if "loss" in r) == STEPS


def test_replacement_node_fetches_its_boxes_from_peer_memory(tmp_path, prepared, nodes,
                                                           four_ranks):
    """Node 1 is replaced by a fresh one with empty memory while node 0 waits in the
    rendezvous: its keeper fetches node 1's slots back from node 0's replica over the keepers'
    protocol, the job goes on on 2 nodes x 2 ranks from memory and ends bitwise equal to an
    uninterrupted run."""
    node0, node1 = start_nodes(tmp_path, prepared, 2, 2, nodes, last_call_s=60)
    run_dir = tmp_path / "run"
    wait_for(lambda: logged_step(run_dir) >= 3 or None, 180, node0)
    node1.kill()
    rdzv, ports = node0.ports
    nodes.append(Node(tmp_path, 1, "1:2", rdzv, ports, prepared, 2, last_call_s=60))
    log = node0.finish() + nodes[-1].finish() + node1.log
    (source, step), = resumes(log)
    assert source.startswith("memory:") and step >= 2, log
    assert "restored 4 slot(s) of this node from the peer replica" in log, log
    assert log.count("layout world_size=4,") == 2, log  # the restored world is 2 x 2 again
    assert_bitwise_equal(final_weights(run_dir, tmp_path), final_weights(four_ranks, tmp_path))
