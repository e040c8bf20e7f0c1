"""torchrun, with each failed run reported on one line: `python -m launch.torchrun ARGS`.

`perennial train` runs this instead of `python -m torch.distributed.run`: the same launcher
(`torch.distributed.run.run`, every torchrun flag), but when workers fail it prints one line
naming the rank and the cause, read from the worker's error file (trainer/errors.py writes it;
torchrun collects it as `ChildFailedError.failures`), instead of torchrun's multi-line
ChildFailedError report and its per-process logs. `PERENNIAL_VERBOSE=1` (`perennial train
--verbose`) keeps torchrun's own output.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous import dynamic_rendezvous
from torch.distributed.run import parse_args, run

from trainer.errors import ENV_LAUNCHER_REPORTS, PEER_LOST

ENV_VERBOSE = "PERENNIAL_VERBOSE"
PREEMPTED_EXIT_CODE = 143  # workers stopped by SIGTERM after saving (trainer/snapshots.py)


def _caller_name(depth: int = 2) -> str:
    """torch's `get_method_name`, without `inspect.stack()`: that reads the source file of
    every frame, twice per rendezvous event, and cost torchrun seconds of CPU per job here
    (measured with py-spy: the launcher waited on it after the workers had finished)."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:
        return "no_method_name"


def main(argv: list[str]) -> int:
    dynamic_rendezvous.get_method_name = _caller_name
    verbose = os.environ.get(ENV_VERBOSE) == "1"
    if not verbose:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)
    os.environ[ENV_LAUNCHER_REPORTS] = "1"  # the workers inherit it: we report, they need not
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        if verbose:
            print(err.format_msg(), file=sys.stderr)
        rank, failure = first_cause(err.failures)
        if failure.exitcode == PREEMPTED_EXIT_CODE:
            return PREEMPTED_EXIT_CODE
        print(f"error: {describe(rank, failure, len(err.failures))}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def first_cause(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The likeliest cause among the failed ranks: a user error, then a death by signal or an
    exit without a record (killed, hang watchdog), then a crash; a rank that failed because
    its peers were gone (lost connections) or that torchrun stopped (SIGTERM) comes last.
    Then the earliest, then the lowest rank."""
    rank = min(failures, key=lambda r: (_rank_as_cause(failures[r]), failures[r].timestamp, r))
    return rank, failures[rank]


def _rank_as_cause(failure: ProcessFailure) -> int:
    message = failure.error_file_data.get("message")
    if isinstance(message, str) and message != "<NONE>":
        return 0  # trainer/errors.py: a user error, one line
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        return 3 if any(fragment in text for fragment in PEER_LOST) else 2
    if failure.exitcode in (-signal.SIGTERM, PREEMPTED_EXIT_CODE):
        return 3
    return 1


def describe(rank: int, failure: ProcessFailure, failed: int) -> str:
    message = failure.message
    if isinstance(message, dict):  # torch's record of an unexpected exception
        message = f"{message.get('message', '?')} (traceback above and in {failure.error_file})"
    elif failure.exitcode < 0:
        message = f"killed by {signal.Signals(-failure.exitcode).name}"
    elif not failure.error_file_data.get("message") or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode} (see its output above)"
    others = f"; {failed - 1} other rank(s) stopped too" if failed > 1 else ""
    return f"rank {rank} failed: {' '.join(str(message).split())}{others}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
