"""A tiny model trained a few steps by a real DeepSpeed ZeRO engine (CPU, gloo), saved with
DeepSpeed's own `engine.save_checkpoint`: the source checkpoints the import tests read."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


class Tiny(torch.nn.Module):
    """Odd sizes, so ZeRO partitions split rows and pad the last rank."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 7)
        self.proj = torch.nn.Linear(7, 11)
        self.norm = torch.nn.LayerNorm(11)
        self.head = torch.nn.Linear(11, 13, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.proj(self.embed(tokens)))))


def ds_config(stage: int, world_size: int) -> dict:
    return {
        "train_batch_size": 2 * world_size,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))


def trained_engine(stage: int, steps: int = 3):
    import deepspeed
    import torch.distributed as dist

    torch.manual_seed(0)
    model = Tiny()
    config = ds_config(stage, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model), config=config,
                                           dist_init_required=False)
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    for _ in range(steps):
        tokens = torch.randint(0, 13, (2, 5), generator=generator)
        loss = torch.nn.functional.cross_entropy(engine(tokens).flatten(0, 1), tokens.flatten())
        engine.backward(loss)
        engine.step()
    return engine, model


def train_and_save(stage: int, save_dir: str, steps: int = 3) -> None:
    """Rank body: train `steps` steps, then DeepSpeed's own engine.save_checkpoint."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    engine, _ = trained_engine(stage, steps)
    # ds_to_universal needs this for ZeRO-1/2 (no tensor-parallel patterns for this model).
    engine.save_checkpoint(save_dir, client_state={UNIVERSAL_CHECKPOINT_INFO: {}})


def save_live(stage: int, root: str) -> None:
    """Rank body: our checkpoint of a live engine (checkpointing/deepspeed/live.py), and beside
    it DeepSpeed's own gather of every full fp32 parameter and Adam moment."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from checkpointing import CheckpointManager
    from checkpointing.deepspeed.live import deepspeed_tensors

    engine, model = trained_engine(stage)
    tensors, values = deepspeed_tensors(engine)
    CheckpointManager(f"{root}/ours").save(3, tensors, {"optimizer": values})
    theirs = {}
    for name, param in model.named_parameters():
        theirs[f"model.{name}"] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(param, key)
            theirs[f"optimizer.state.{name}.{key}"] = full.clone()
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in theirs.items()}, f"{root}/deepspeed.safetensors")


def to_universal(src: str, step_dir: str = "global_step3") -> None:
    """DeepSpeed's ds_to_universal conversion of `src/step_dir`, in this process."""
    import sys

    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", f"{src}/{step_dir}",
                "--output_folder", f"{src}/{step_dir}_universal",
                "--num_extract_workers", "1", "--num_merge_workers", "1"]
    ds_to_universal.main(ds_to_universal.parse_arguments())


def make_sources(root: str) -> None:
    """Rank body: every source the DeepSpeed tests read, from one launch (a DeepSpeed import
    costs seconds per process): root/zero{1,2,3} (engine.save_checkpoint, then ds_to_universal
    on rank 0) and root/live{1,3} (save_live)."""
    import torch.distributed as dist

    for stage in (1, 2, 3):
        train_and_save(stage, f"{root}/zero{stage}")
        dist.barrier()
        if dist.get_rank() == 0:
            to_universal(f"{root}/zero{stage}")
    for stage in (1, 3):
        save_live(stage, f"{root}/live{stage}")


if __name__ == "__main__":  # torchrun --nproc-per-node 2 -m <this module> ROOT
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")
    make_sources(sys.argv[1])
    dist.barrier()  # no rank tears gloo down while another still writes
    dist.destroy_process_group()
    from trainer.distributed import exit_skipping_teardown

    exit_skipping_teardown(0)
