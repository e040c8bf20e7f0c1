"""Seeds of randomised tests: drawn fresh each run unless given, always printed, so that any
failure can be replayed with the same draw."""

from __future__ import annotations

import os
import time


def replayable_seed(env_var: str) -> int:
    """The seed in `env_var` when set, else a new one from the clock; printed either way
    (pytest shows it with the failure's captured output)."""
    given = os.environ.get(env_var)
    seed = int(given) if given else time.time_ns() % 2**32
    print(f"random seed {seed}: replay with {env_var}={seed}", flush=True)
    return seed
