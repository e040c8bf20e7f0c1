import multiprocessing as mp

import pytest

from trainer.run_identity import RUN_ID_FILE, ensure_run_id, read_run_id


def test_created_once_and_stable(tmp_path):
    run = tmp_path / "run"
    assert read_run_id(run) is None
    first = ensure_run_id(run)
    assert ensure_run_id(run) == first == read_run_id(run)
    assert not [p for p in run.iterdir() if p.name != RUN_ID_FILE]  # no temp files left


def test_recreated_directory_is_a_new_run(tmp_path):
    first = ensure_run_id(tmp_path / "run")
    (tmp_path / "run" / RUN_ID_FILE).unlink()
    assert ensure_run_id(tmp_path / "run") != first


def _create(run_dir, queue):
    queue.put(ensure_run_id(run_dir))


def test_concurrent_creators_agree(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(tmp_path / "run", queue)) for _ in range(6)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=30) for _ in procs}
    for p in procs:
        p.join()
    assert len(ids) == 1


def test_damaged_id_is_named(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("not/an id")
    with pytest.raises(ValueError, match="run_id"):
        read_run_id(tmp_path)
