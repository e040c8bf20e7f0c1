"""Memory-snapshot settings the trainer refuses, with one line naming the key."""

from __future__ import annotations

from tests.trainer.runs import perennial, tiny_job


def test_moe_with_memory_snapshots_is_refused(tmp_path, data_cache):
    args = tiny_job(tmp_path / "run", data_cache, "model.moe.num_experts=4",
                    "model.moe.top_k=2", "checkpoint.interval=1", "train.max_steps=4")
    proc = perennial("train", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint.interval" in proc.stderr and "MoE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())
