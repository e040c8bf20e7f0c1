"""`ckpt inspect | verify | export`, path resolution, keep/latest bookkeeping."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from checkpointing import CheckpointManager, find_loadable, resolve_checkpoint
from checkpointing.cli import main as ckpt


def saved_run(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints", keep=2, block_size=64)
    gen = torch.Generator().manual_seed(0)
    weights = {
        "model.w": torch.randn(7, 5, generator=gen),
        "model.b": torch.randn(7, generator=gen),
    }
    extra = {"optimizer.state.w.exp_avg": torch.randn(7, 5, generator=gen)}
    for step in (10, 20, 30):
        mgr.save(step, weights | extra | {"model.step": torch.tensor(step)}, {"step": step})
    return run, weights


def test_keep_latest_and_resolution(tmp_path):
    run, _ = saved_run(tmp_path)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000020", "step-00000030"]
    assert (root / "latest").read_text().strip() == "step-00000030"
    newest = root / "step-00000030"
    assert (
        resolve_checkpoint(run) == resolve_checkpoint(root) == resolve_checkpoint(newest) == newest
    )
    assert [(c.step, c.problem) for c in find_loadable(run)] == [(30, None), (20, None)]


def test_inspect_text_and_json(tmp_path, capsys):
    run, _ = saved_run(tmp_path)
    assert ckpt(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    assert "step 30" in text and "model.w" in text and "7x5" in text and "float32" in text
    assert ckpt(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 30 and info["world_size"] == 1
    assert info["tensors"]["model.w"] == {
        "shape": [7, 5],
        "dtype": "float32",
        "bytes": 140,
        "shards": 1,
        "layout": None,
    }


def test_verify_and_export(tmp_path, capsys):
    run, weights = saved_run(tmp_path)
    assert ckpt(["verify", str(run)]) == 0
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "weights.safetensors"
    assert ckpt(["export", str(run), str(out), "--format", "safetensors"]) == 0
    exported = load_file(str(out))
    assert sorted(exported) == ["b", "step", "w"]
    for name, value in weights.items():
        assert torch.equal(exported[name.removeprefix("model.")], value)
    assert exported["step"].item() == 30


def test_user_errors_are_one_line(tmp_path, capsys):
    assert ckpt(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert ckpt(["verify", str(tmp_path / "empty")]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
    assert ckpt(["export", str(tmp_path)]) == 2  # argparse: OUT missing
