"""One W&B run per training run, resumed across restarts and requeues, each step once.

The W&B run id is the run directory's id (trainer/run_identity.py), `resume="allow"`, its name
`run.name`. A worker killed hard loses what W&B had not yet written (it flushes every 15 s), so
on a resume the steps W&B lacks up to the restored step are sent again from `metrics.jsonl`,
and the steps it already holds are not sent twice. Offline, each start leaves a session
directory `wandb/offline-run-*-<id>`; `wandb sync` uploads them into the one run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from trainer.run_identity import ensure_run_id


def start_wandb(run_dir: str, name: str, project: str, config_dict):
    import wandb

    # A W&B service inherited from whatever launched us (a notebook, a test) outlives a killed
    # worker and keeps its run open: the restarted worker would get "run ID ... is in use".
    os.environ.pop("WANDB_SERVICE", None)
    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(
        project=project, id=ensure_run_id(run_dir), resume="allow", name=name, dir=run_dir,
        mode=mode, config=config_dict,
    )


def last_step_held(run, run_dir: str) -> int:
    """The last step the W&B run holds from earlier starts (0 for a new run)."""
    if not run.settings._offline:
        return max(run.starting_step - 1, 0)  # what the server has, told on resume
    sessions = sorted(Path(run_dir, "wandb").glob(f"offline-run-*-{run.id}"), reverse=True)
    for session in sessions:  # the newest session holding any step holds the last one
        if session.name != Path(run.settings.sync_dir).name:
            step = _offline_session_step(session)
            if step is not None:
                return step
    return 0


def _offline_session_step(session: Path) -> int | None:
    """The last step an offline session wrote, read with W&B's own reader of its log."""
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(session)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return json.loads(out).get("step")


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat
