"""tests/distributed.py: a rank that dies hard fails `run_distributed` with its exit code
within the timeout; it never blocks on a result that will not come."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import torch.distributed as dist

from tests.distributed import run_distributed

DEADLINE_S = 60  # far above a spawn of two ranks, far below "forever"


def rank_returns(value: int) -> int:
    dist.barrier()
    return value * 10 + dist.get_rank()


def rank1_dies(how: str) -> None:
    dist.barrier()  # both ranks are up
    if dist.get_rank() == 1:
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    # rank 0 returns its result: the old harness then waited forever for rank 1's


def rank0_sleeps() -> None:
    if dist.get_rank() == 0:
        time.sleep(120)


def call_bounded(fn, *args, **kwargs):
    """Call run_distributed in a thread: a hang fails this test instead of blocking it."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run_distributed(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"run_distributed still blocked after {DEADLINE_S}s"
    return outcome, time.monotonic() - start


def test_results_in_rank_order():
    outcome, _ = call_bounded(rank_returns, world_size=2, args=(4,))
    assert outcome == {"result": [40, 41]}


@pytest.mark.parametrize("how, code", [("sigkill", "exit code -9 (SIGKILL)"),
                                       ("os_exit", "exit code 3")])
def test_a_rank_dying_hard_fails_with_its_exit_code(how, code):
    outcome, _ = call_bounded(rank1_dies, world_size=2, args=(how,), timeout=DEADLINE_S - 10)
    assert isinstance(outcome.get("error"), RuntimeError), outcome
    assert f"rank 1 died before returning a result ({code})" in str(outcome["error"])


def test_a_rank_that_never_returns_fails_at_the_timeout():
    outcome, elapsed = call_bounded(rank0_sleeps, world_size=2, timeout=20)
    assert isinstance(outcome.get("error"), TimeoutError), outcome
    assert re.match(r"ranks \[0(, 1)?\] gave no result within", str(outcome["error"]))
    assert elapsed < DEADLINE_S
