"""Child process for test_nonblocking_save: a non-blocking save SIGKILLed in one phase.

    python -m tests.checkpointing.save_crash_child ROOT PHASE

Saves step 1 (blocking), then step 2 with blocking=False, and kills itself with SIGKILL at
the first (or given) call of the function that does PHASE: copy (staging into host buffers),
write (tensor bytes into the shard file), fsync (the shard file), rename (the commit), latest
(replacing `latest`, after the commit). PHASE=none lets the save finish.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from checkpointing import CheckpointManager, staging, storage


def state(step: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((64, 33), float(step)),
        "b": torch.arange(40) * step,
        "n": torch.tensor(step),
    }


def kill_on_call(n: int, real):
    calls = [0]

    def hook(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return hook


def main(root: str, phase: str) -> None:
    manager = CheckpointManager(root, block_size=1024)
    manager.save(1, state(1))
    if phase == "copy":
        staging.copy_into = kill_on_call(2, staging.copy_into)
    elif phase == "write":
        storage.tensor_bytes = kill_on_call(2, storage.tensor_bytes)
    elif phase == "fsync":
        os.fsync = kill_on_call(1, os.fsync)
    elif phase == "rename":
        os.rename = kill_on_call(1, os.rename)
    elif phase == "latest":
        os.replace = kill_on_call(1, os.replace)
    manager.save(2, state(2), {"step": 2}, blocking=False)
    manager.wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
