"""`perennial ckpt import` of real DeepSpeed ZeRO-1/2/3 checkpoints (2 gloo ranks, CPU): weights
equal DeepSpeed's zero_to_fp32 consolidation and Adam moments equal ds_to_universal's, exactly;
a ds_to_universal folder imports to the same checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager
from checkpointing.deepspeed.importer import import_deepspeed_checkpoint
from tests.checkpointing.conftest import run_python
from tests.trainer.runs import perennial


def load_ours(root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = next(root.glob("step-*"))
    index = json.loads((path / "index.json").read_text())["tensors"]
    tensors = {k: torch.empty(v["shape"], dtype=torch.float32) for k, v in index.items()}
    result = CheckpointManager(root).load(path, tensors)
    return tensors, result.global_state


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_import_equals_deepspeeds_consolidation(tmp_path, deepspeed_sources, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = deepspeed_sources / f"zero{stage}"
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

    # The same conversion as the command above, in this process (a command costs seconds).
    import_deepspeed_checkpoint(src / "global_step3_universal", tmp_path / "uni")
    from_universal, _ = load_ours(tmp_path / "uni")
    assert from_universal.keys() == ours.keys()
    for key, value in ours.items():
        if not key.endswith(".step") or stage != 3:  # ZeRO-3 universal folders keep no step
            assert torch.equal(from_universal[key], value), key


@pytest.mark.slow
def test_reading_needs_no_deepspeed(deepspeed_sources):
    """DeepSpeed's record classes unpickle into inert stand-ins."""
    sources = [str(deepspeed_sources / f"zero{stage}") for stage in (1, 2, 3)]
    run_python("-c", "import sys; from checkpointing.deepspeed.files import read_deepspeed; "
                     f"[read_deepspeed(s) for s in {sources!r}]; "
                     "assert 'deepspeed' not in sys.modules")


def test_import_of_a_non_zero_folder_is_one_line(tmp_path):
    (tmp_path / "src" / "global_step1").mkdir(parents=True)
    (tmp_path / "src" / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"junk")
    proc = perennial("ckpt", "import", str(tmp_path / "src"), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "optim_states.pt" in proc.stderr.strip().splitlines()[-1]
