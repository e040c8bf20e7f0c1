"""`perennial ckpt import/export --format hf`, end to end through `perennial train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from launch.ckpt_command import detect_source_kind
from launch.cli import main as perennial_main
from tests.trainer.model.test_hf import assert_same_logits, load_ours, save_tiny_hf
from tests.trainer.runs import REPO, perennial, tiny_job


def ckpt(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop earlier output (transformers' progress bars)
    code = perennial_main(["ckpt", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_import_train_export_round_trip(tmp_path, capsys):
    hf_model = save_tiny_hf(tmp_path / "hf")
    code, out, _ = ckpt(capsys, "import", tmp_path / "hf", tmp_path / "imported")
    assert code == 0 and "step-00000000" in out
    state = json.loads((tmp_path / "imported" / "step-00000000" / "state.json").read_text())
    assert state["global_state"]["source"] == {"format": "hf", "path": str(tmp_path / "hf")}
    assert "dim: 64" in state["global_state"]["config"]

    run = tmp_path / "run"  # no model.* overrides: the run takes them from the import
    job = tiny_job(run, tmp_path / "cache", "train.max_steps=3",
                   f"init.from={tmp_path / 'imported'}", "parallel.strategy=ddp")  # fmt: skip
    proc = perennial("train", *job)
    assert "warm start: weights from" in proc.stderr
    assert "(imported) sets model." in proc.stderr and "model.vocab_size=320" in proc.stderr

    code, out, _ = ckpt(capsys, "export", run, tmp_path / "out", "--format", "hf")
    assert code == 0 and "byte tokenizer" in out and "model.safetensors" in out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    ours = load_ours(run)
    assert_same_logits(ours, exported.eval())
    tokens = torch.arange(24)[None]
    with torch.no_grad():  # training moved the weights away from the imported ones
        assert not torch.allclose(ours(tokens), hf_model(tokens).logits, atol=1e-3)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (256, 257)


def test_sharded_export_writes_a_correct_index(tmp_path, capsys):
    hf_model = save_tiny_hf(tmp_path / "hf", tied=True)
    assert ckpt(capsys, "import", tmp_path / "hf", tmp_path / "imported")[0] == 0
    out = tmp_path / "out"
    code, _, _ = ckpt(capsys, "export", tmp_path / "imported", out, "--format=hf",
                      "--max-shard-size", "50KB")  # fmt: skip
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total, by_file = 0, {}
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            by_file[file] = set(f.keys())
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert {k: f for f, keys in by_file.items() for k in keys} == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert "lm_head.weight" not in index["weight_map"]  # tied: HF does not save it
    assert sorted(index["weight_map"]) == sorted(
        k for k in hf_model.state_dict() if k != "lm_head.weight"
    )
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert_same_logits(load_ours(tmp_path / "imported"), exported.eval())
    umask = os.umask(0)
    os.umask(umask)
    for file in files:  # safetensors writes 0600; an export is an ordinary file
        assert (out / file).stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_bad_sources_fail_with_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = ckpt(capsys, "import", tmp_path / "empty", tmp_path / "o1")
    assert code == 2 and str(tmp_path / "empty" / "config.json") in err
    errors = [err]

    (tmp_path / "gpt2").mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")
    code, _, err = ckpt(capsys, "import", tmp_path / "gpt2", tmp_path / "o2")
    assert code == 2 and "GPT2LMHeadModel" in err and str(tmp_path / "gpt2") in err
    errors.append(err)

    save_tiny_hf(tmp_path / "sharded", shard="60KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = ckpt(capsys, "import", tmp_path / "sharded", tmp_path / "o3")
    assert code == 2 and str(shard) in err and "missing" in err
    assert not (tmp_path / "o3").exists()
    for message in [*errors, err]:
        assert message.count("\n") == 1 and message.startswith("error: ")


def test_source_kinds_and_delegation(tmp_path, capsys):
    save_tiny_hf(tmp_path / "hf")
    assert detect_source_kind(tmp_path / "hf") == "hf"
    deepspeed = tmp_path / "ds" / "global_step10"
    deepspeed.mkdir(parents=True)
    (deepspeed / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert detect_source_kind(tmp_path / "ds") == "deepspeed"
    code, _, err = ckpt(capsys, "import", tmp_path / "ds", tmp_path / "o")
    assert code == 2 and "optim_states.pt (not a ZeRO checkpoint)" in err  # import: see
    # tests/checkpointing/test_deepspeed_import.py

    assert ckpt(capsys, "import", tmp_path / "hf", tmp_path / "imported")[0] == 0
    assert detect_source_kind(tmp_path / "imported") == "perennial"
    code, out, _ = ckpt(capsys, "inspect", tmp_path / "imported")  # checkpointing.cli's
    assert code == 0 and "model.layers.1.feed_forward.w2.weight" in out
    code, out, _ = ckpt(capsys, "export", tmp_path / "imported", tmp_path / "w.safetensors")
    assert code == 0 and (tmp_path / "w.safetensors").is_file()
    code, _, err = ckpt(capsys, "export", tmp_path / "imported", tmp_path / "w.safetensors")
    assert code == 2 and "w.safetensors already exists" in err  # as --format hf refuses
    inspect = subprocess.Popen([sys.executable, "-m", "launch.cli", "ckpt", "inspect",
                                str(tmp_path / "imported")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    inspect.stdout.close()  # `| head` that has read enough: every write hits a closed pipe
    assert inspect.wait(timeout=120) == 0
    assert inspect.stderr.read() == b""
    assert ckpt(capsys, "import", tmp_path / "hf", tmp_path / "imported")[0] == 2  # not empty
