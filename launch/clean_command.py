"""`perennial clean RUN_DIR`: free the shared memory that runs in RUN_DIR left behind.

A whole-job kill (SIGKILL of every process, a lost node) leaves the memory tier's slots in
/dev/shm, kept so that a restart of the same run resumes from them; the next start of another
run in that directory removes them, and this command does it now. Memory a live keeper holds
is never touched.
"""

from __future__ import annotations

import shutil

from launch.keepers import SHM_BASE, job_id, keeper_alive
from trainer.args import Parser


def clean_command(argv: list[str]) -> int:
    parser = Parser(prog="perennial clean", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory whose memory snapshots to free")
    args = parser.parse_args(argv)
    found = sorted(SHM_BASE.glob(f"{job_id(args.run_dir)}*")) if SHM_BASE.is_dir() else []
    for path in found:
        if keeper_alive(path):
            print(f"kept {path}: its keeper is running (stop that run first)")
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}")
    if not found:
        print(f"no memory snapshots of {args.run_dir} in {SHM_BASE}")
    return 0
