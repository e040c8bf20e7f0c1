"""The README's commands, run as written: the quick tour and the Hugging Face path (Llama and
Mixtral). Each command gets the tiny-job overrides appended (`key=value` goes in any order),
so a test takes seconds instead of the documented job's minutes; nothing else changes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.trainer.model.test_hf import save_tiny_hf
from tests.trainer.runs import REPO

pytestmark = pytest.mark.slow
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "data.seq_len=32", "train.global_batch_size=12", "train.micro_batch_size=2",
        "train.max_steps=2", "eval.interval=0", "log.progress=false"]
SIZES = ("model.", "data.seq_len", "train.global_batch_size", "train.micro_batch_size")


def readme_commands(section: str) -> list[str]:
    """The command lines of the first bash block under the README heading `section`."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(section):]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(("perennial ", "torchrun "))]


def run(command: str, cwd: Path, cache: Path, tiny: list[str] | None = None):
    argv = shlex.split(command)
    if argv[:2] == ["perennial", "train"] or argv[0] == "torchrun":
        argv += [f"data.cache_dir={cache}", *(TINY if tiny is None else tiny)]
    if argv[0] == "perennial":
        argv = [sys.executable, "-m", "launch.cli", *argv[1:]]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_quick_tour(tmp_path):
    commands = readme_commands("## Quick tour")
    assert len(commands) == 10, commands
    for command in commands:
        if "--nproc 2" in command or "--dry-run" in command:
            # Layouts are trained in tests/trainer/test_train.py and parallel/; here they
            # resolve and pass the checks the launcher makes before any process starts.
            run(f"{command} --dry-run" if "--dry-run" not in command else command,
                tmp_path, tmp_path / "cache")
        else:  # `perennial train`, with a config file, and the worker under plain torchrun
            run(command, tmp_path, tmp_path / "cache")
    assert (tmp_path / "runs" / "default" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "tp" / "checkpoints").is_dir()


def test_resume_on_another_layout_with_the_default_batch(tmp_path):
    """The README's resume example as written: the default job (its batch, model and data),
    2 DDP ranks then 3 FSDP2 ranks; only the step counts are shortened."""
    first, second = readme_commands("### Resume, change layout")
    quiet, cache = ["eval.interval=0", "log.progress=false"], tmp_path / "cache"
    run(first, tmp_path, cache, ["train.max_steps=2", "schedule.total_steps=4", *quiet])
    resumed = run(second, tmp_path, cache, ["train.max_steps=4", *quiet])
    assert "(step 2)" in resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/a/metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r][-1] == 4


def save_tiny_mixtral(path: Path) -> None:
    from tests.trainer.model.test_hf_mixtral import MOE
    from trainer.model.hf import model_config_to_hf

    moe = replace(MOE, vocab_size=320, max_seq_len=64)  # the byte tokenizer's ids fit
    config = model_config_to_hf({**moe.__dict__, "moe": moe.moe.__dict__})
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**config)).save_pretrained(path)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_hugging_face_path(tmp_path, family):
    (save_tiny_hf if family == "llama" else save_tiny_mixtral)(tmp_path / "path/to/hf_llama")
    # The model comes from the import: no model.* overrides (the tiny HF model is tiny already).
    tiny = [k for k in TINY if not k.startswith(SIZES)] + ["data.seq_len=32"]
    tiny += ["train.global_batch_size=4", "train.micro_batch_size=2"]
    commands = [c for c in readme_commands("### Hugging Face") if "deepspeed" not in c]
    assert len(commands) == 4, commands
    outputs = [run(command, tmp_path, tmp_path / "cache", tiny) for command in commands]
    assert "(imported) sets model." in outputs[1].stderr
    assert "importing the Hugging Face model" in outputs[2].stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out", local_files_only=True)
    expected = "LlamaForCausalLM" if family == "llama" else "MixtralForCausalLM"
    assert type(exported).__name__ == expected
    source = json.loads((tmp_path / "path/to/hf_llama" / "config.json").read_text())
    config = json.loads((tmp_path / "hf-out" / "config.json").read_text())
    assert config["hidden_size"] == source["hidden_size"]
    assert config["num_hidden_layers"] == source["num_hidden_layers"]
