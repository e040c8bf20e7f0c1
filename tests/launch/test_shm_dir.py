"""`perennial train --shm-dir DIR`: where this node's keeper keeps its memory; a bad one is a
one-line error before anything starts."""

from __future__ import annotations

from tests.trainer.runs import perennial, tiny_job


def test_bad_shm_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for bad, why in (("relative/dir", "must be an absolute path"),
                     (str(blocker / "shm"), "cannot create it")):
        proc = perennial("train", *tiny_job(tmp_path / "run", tmp_path, "checkpoint.interval=1"),
                         "--shm-dir", bad, check=False)
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
