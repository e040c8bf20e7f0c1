"""A Hugging Face Accelerate training loop over Perennial's Llama, checkpointed in Perennial's
universal format through its small public API (CheckpointManager, model_tensors,
optimizer_tensors, apply_model_tensors, apply_optimizer_tensors).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        scripts/accelerate_example.py --ckpt-dir runs/acc/checkpoints --steps 20 --save-every 5 \\
        model.dim=64 model.n_layers=2

On one machine without GPUs, `accelerate launch --num_processes 2 --cpu` starts ONE process
(Accelerate 1.x runs multi-CPU jobs only through mpirun with a hostfile); the command above
starts two through torchrun, and ACCELERATE_USE_CPU=1 makes them a gloo MULTI_CPU group. The
script refuses to run when WORLD_SIZE and Accelerate's process count disagree.

It trains on random tokens (seeded per step and rank), saves every --save-every steps and at
the end, and resumes from the newest checkpoint in --ckpt-dir, else from --init-from (any
Perennial checkpoint dir, root or run dir, e.g. a `perennial train` run: model, optimizer and
step count). `model.*=value` arguments set the model like `perennial train`'s overrides do.
The saved global_state holds `step`, `optimizer` and `config` (the `model:` section as YAML),
so `perennial train init.from=<ckpt-dir>` and `perennial ckpt export ... --format hf` read it.

FSDP: on CPU, Accelerate silently turns an FSDP plugin into DDP, so on CPU (and in
tests/scripts/test_accelerate_example.py) only the DDP path runs. With GPUs,
`accelerate launch --use_fsdp --fsdp_version 2 ...` shards the model with FSDP2; the
checkpoint calls are the same (model_tensors/optimizer_tensors return DTensors there).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from omegaconf import OmegaConf

from checkpointing import (
    CheckpointManager,
    apply_model_tensors,
    apply_optimizer_tensors,
    model_tensors,
    optimizer_tensors,
)
from trainer.distributed import exit_skipping_teardown
from trainer.model import Llama, ModelConfig
from trainer.model.hf import model_config_from_dict

BYTE_VOCAB = 258


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, ModelConfig]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True, help="checkpoint root to save into")
    parser.add_argument("--init-from", default="", help="Perennial checkpoint to start from")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    model = OmegaConf.to_container(OmegaConf.from_dotlist(overrides)).get("model", {})
    if set(OmegaConf.from_dotlist(overrides)) - {"model"}:
        parser.error(f"only model.*=value overrides are accepted, got {overrides}")
    return args, model_config_from_dict({"vocab_size": BYTE_VOCAB, **model})


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, like `perennial train`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def random_batch(args, cfg: ModelConfig, step: int, rank: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
    tokens = torch.randint(
        0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator
    )
    return tokens[:, :-1], tokens[:, 1:]


def checkpoint_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = model_tensors(model)
    optim_tensors, optim_json = optimizer_tensors(model, optimizer)
    return {**tensors, **optim_tensors}, optim_json


def restore(manager: CheckpointManager, model, optimizer, init_from: str) -> tuple[int, str]:
    """(step to continue from, what was loaded); (0, "") for a fresh start."""
    tensors, _ = checkpoint_tensors(model, optimizer)
    result = manager.load_latest(tensors)
    if result is None and init_from:
        result = manager.load(init_from, tensors)
    if result is None:
        return 0, ""
    apply_model_tensors(model, tensors)
    apply_optimizer_tensors(model, optimizer, tensors, result.global_state["optimizer"])
    return result.step, str(result.path)


def save(manager: CheckpointManager, model, optimizer, cfg: ModelConfig, step: int) -> None:
    tensors, optim_json = checkpoint_tensors(model, optimizer)
    state = {
        "step": step,
        "optimizer": optim_json,
        "config": yaml.safe_dump({"model": asdict(cfg)}),
        "source": {"format": "accelerate"},
    }
    manager.save(step, tensors, state)


def main(argv: list[str]) -> int:
    args, cfg = parse_args(argv)
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SystemExit(
            f"error: {launched} processes were launched but Accelerate sees "
            f"{accelerator.num_processes} (on CPU set ACCELERATE_USE_CPU=1)"
        )
    torch.manual_seed(args.seed)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    model, optimizer = accelerator.prepare(model, build_optimizer(model, args.lr))
    inner_optimizer = optimizer.optimizer  # the torch optimizer Accelerate wraps
    manager = CheckpointManager(args.ckpt_dir, keep=args.keep)
    start, source = restore(manager, model, inner_optimizer, args.init_from)
    if source:
        accelerator.print(f"resumed from {source} (step {start})")
    for step in range(start + 1, args.steps + 1):
        inputs, targets = random_batch(args, cfg, step, accelerator.process_index)
        logits = model(inputs.to(accelerator.device))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(accelerator.device).flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step} loss {loss.item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save(manager, model, inner_optimizer, cfg, step)
            accelerator.print(f"saved step {step} to {args.ckpt_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_skipping_teardown(main(sys.argv[1:]))  # gloo threads can hang or abort a normal exit
