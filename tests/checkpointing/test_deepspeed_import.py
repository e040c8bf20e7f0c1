"""`perennial ckpt import` of real DeepSpeed ZeRO-1/2/3 checkpoints (2 gloo ranks, CPU): weights
equal DeepSpeed's zero_to_fp32 consolidation and Adam moments equal ds_to_universal's, exactly;
a ds_to_universal folder imports to the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager
from tests.trainer.runs import REPO, perennial

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def run(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "Warning" not in line]
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n".join(errors)[:4000]


def deepspeed_checkpoint(stage: int, root: Path) -> Path:
    """DeepSpeed's own save (torchrun, 2 ranks) plus its ds_to_universal conversion."""
    src = root / f"zero{stage}"
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "tests.checkpointing.deepspeed_engines", str(stage), str(src))
    run("-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src / "global_step3"),
        "--output_folder", str(src / "global_step3_universal"),
        "--num_extract_workers", "1", "--num_merge_workers", "1")
    return src


def load_ours(root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = next(root.glob("step-*"))
    index = json.loads((path / "index.json").read_text())["tensors"]
    tensors = {k: torch.empty(v["shape"], dtype=torch.float32) for k, v in index.items()}
    result = CheckpointManager(root).load(path, tensors)
    return tensors, result.global_state


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_import_equals_deepspeeds_consolidation(tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = deepspeed_checkpoint(stage, tmp_path)
    proc = perennial("ckpt", "import", str(src), str(tmp_path / "ours"))
    assert "imported deepspeed" in proc.stdout
    ours, state = load_ours(tmp_path / "ours")
    assert state["step"] == 3

    weights = get_fp32_state_dict_from_zero_checkpoint(str(src))
    assert {k for k in ours if k.startswith("model.")} == {f"model.{k}" for k in weights}
    universal = src / "global_step3_universal" / "zero"
    for name, weight in weights.items():
        assert torch.equal(ours[f"model.{name}"], weight), name
        for key in ("exp_avg", "exp_avg_sq"):
            theirs = torch.load(universal / name / f"{key}.pt", weights_only=True)
            theirs = theirs["param"] if isinstance(theirs, dict) else theirs
            assert torch.equal(ours[f"optimizer.state.{name}.{key}"].flatten(),
                               theirs.flatten()), (name, key)
        assert float(ours[f"optimizer.state.{name}.step"]) == 3.0
    decay = state["optimizer"]["optimizer.param_groups.proj.weight.weight_decay"]
    assert decay == 0.1 and state["optimizer"]["optimizer.param_groups.proj.bias.weight_decay"] == 0

    # Reading needs no DeepSpeed: its record classes unpickle into inert stand-ins.
    run("-c", f"import sys; from checkpointing.deepspeed.files import read_deepspeed; "
              f"read_deepspeed({str(src)!r}); assert 'deepspeed' not in sys.modules")
    perennial("ckpt", "import", str(src / "global_step3_universal"), str(tmp_path / "uni"))
    from_universal, _ = load_ours(tmp_path / "uni")
    assert from_universal.keys() == ours.keys()
    for key, value in ours.items():
        if not key.endswith(".step") or stage != 3:  # ZeRO-3 universal folders keep no step
            assert torch.equal(from_universal[key], value), key


def test_import_of_a_non_zero_folder_is_one_line(tmp_path):
    (tmp_path / "src" / "global_step1").mkdir(parents=True)
    (tmp_path / "src" / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"junk")
    proc = perennial("ckpt", "import", str(tmp_path / "src"), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "optim_states.pt" in proc.stderr.strip().splitlines()[-1]
