"""The job configuration: typed dataclasses whose defaults are the embedded default job.

Loaded from YAML with omegaconf, overridden with `key=value` arguments, validated before any
process group starts; every error names the key it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.config import DataConfig
from trainer.model.config import ModelConfig
from trainer.schedule import ScheduleConfig

AUTO_MICRO_BATCH_MAX = 8
"""train.micro_batch_size=0 picks the largest divisor of the per-rank batch up to this."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl and checkpoints/ live here."""
    name: str = ""
    """Run name for loggers; empty = the run directory's base name."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer step at which this run stops (the schedule may be longer)."""
    global_batch_size: int = 24
    """Sequences per optimizer step, whatever the world size; must be divisible by the
    data-parallel size (the default 24 fits 1, 2, 3, 4 and 8 processes)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one rank; gradient accumulation fills the rest.
    0 = auto: the largest divisor of the per-rank batch (global_batch_size / data-parallel
    size) that is <= 8. An explicit value must divide the per-rank batch."""
    seed: int = 1234
    """Seeds weight init, the data order and the per-rank RNG streams."""
    log_interval: int = 10
    """Steps between metric lines (the first and last step are always logged)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """torch.compile each transformer block."""
    return_freed_host_memory: bool = False
    """Make glibc hand freed host buffers above 128 KiB back to the OS (mallopt), so the
    per-block buffers FSDP2 frees do not stay resident: bounds host RSS near the shard size
    for models whose state is close to the host's memory. Off by default: on CPU it costs
    page faults at every step (measured 2x slower steps on the default job)."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    hang_timeout_s: float = 0.0
    """Seconds one step (its eval and checkpoint writes included) may take before the rank
    dumps its stacks and exits so the launcher restarts the group from the newest checkpoint;
    0 = off. Give it several times the slowest step (see trainer/health.py)."""

    def micro_batch_for(self, dp: int) -> int:
        """micro_batch_size on `dp` data-parallel ranks, resolving 0 (auto)."""
        if self.micro_batch_size:
            return self.micro_batch_size
        per_rank = self.global_batch_size // dp
        return max(m for m in range(1, min(per_rank, AUTO_MICRO_BATCH_MAX) + 1)
                   if per_rank % m == 0)


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer; only adamw."""
    lr: float = 3e-3
    """Peak learning rate (the schedule scales it)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""


@dataclass
class ParallelConfig:
    strategy: str = "fsdp"
    """Data parallelism: fsdp (FSDP2 fully_shard), ddp, or deepspeed (a ZeRO engine)."""
    tp: int = 1
    """Tensor-parallel degree; the data-parallel degree is world_size / (pp x tp)."""
    ep: int = 1
    """Expert-parallel degree for MoE models: each MoE layer's experts are split across groups
    of `ep` data-parallel ranks and tokens are exchanged by all-to-all (strategy=fsdp, tp=1;
    model.moe.num_experts and the data-parallel size divisible by it)."""
    pp: int = 1
    """Pipeline-parallel degree: the model is cut by layers into stages (the embedding on the
    first, the final norm and head on the last) over `pp` ranks; the data-parallel degree is
    world_size / (pp x tp). For now: strategy=fsdp, dense models (no MoE, no tied
    embeddings), no mid-run growth, and checkpoint.interval=0 (disk checkpoints only)."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule with parallel.pp > 1: 1F1B, GPipe, or Interleaved1F1B (two stages per
    rank, so model.n_layers >= 2 x pp)."""
    pp_microbatches: int = 0
    """Micro batches the pipeline splits each rank's batch into (>= the number of stages, and
    dividing global_batch_size / data-parallel size); 0 = one per train.micro_batch_size
    sequences, the same micro batches gradient accumulation uses without pipelining."""
    zero_stage: int = 1
    """With strategy=deepspeed: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ weights)
    partitioned over the data-parallel ranks."""
    ds_config: str = ""
    """With strategy=deepspeed: optional DeepSpeed JSON merged into the config derived from ours;
    a key that contradicts ours (batch sizes, clipping, precision, stage, optimizer, scheduler)
    is an error naming both keys ("auto" takes ours)."""


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Write checkpoints at all."""
    dir: str = ""
    """Checkpoint root; empty = <run.dir>/checkpoints."""
    persist_interval: int = 100
    """Steps between committed on-disk checkpoints (the last step is always committed)."""
    save_budget: float = 0.01
    """Without memory snapshots: also save to disk (non-blocking) between persist_interval
    saves, as often as keeps their measured cost under this fraction of training time
    (first at step 10); 0 = only every persist_interval steps."""
    keep: int = 3
    """Committed checkpoints kept on disk; older ones are deleted after a new commit."""
    interval: int = 0
    """Steps between in-memory snapshots held by the per-node keeper (0 = off); with it on,
    the keeper persists every persist_interval steps in the background."""
    replicas: int = 0
    """1 = also copy each node's snapshots to the next node's keeper (survives node loss)."""

    def memory_snapshots(self) -> bool:
        """Whether the run takes in-memory snapshots (and `perennial train` starts keepers)."""
        return self.enabled and self.interval > 0


@dataclass
class EvalConfig:
    interval: int = 100
    """Steps between evaluations on held-out data (and at the last step); 0 disables."""


@dataclass
class LogConfig:
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "perennial"
    """W&B project name."""
    progress: bool = True
    """Show a progress bar on rank 0 between metric lines."""


@dataclass
class InitConfig:
    from_: str = ""
    """Warm start (`init.from`): a checkpoint or run directory whose weights start this run."""
    load_optimizer: bool = False
    """With init.from: also load the optimizer state (otherwise it starts fresh)."""
    load_schedule: bool = False
    """With init.from: continue the source's schedule step instead of starting at 0."""


@dataclass
class GrowConfig:
    """Mid-run model growth (`grow.*`): at step `at_step` the trainer applies the same transform
    as `perennial grow KIND` (trainer/growth/) to its live state and continues; see
    trainer/growth/midrun.py."""

    at_step: int = 0
    """Step boundary at which the model grows; 0 = never."""
    kind: str = "upcycle"
    """upcycle (dense -> MoE) or stack (deeper)."""
    optimizer: str = "copy"
    """copy/keep: carry AdamW moments into the grown parameters; reset: start them fresh."""
    num_experts: int = 8
    """upcycle: copies of each dense MLP (--num-experts)."""
    top_k: int = 2
    """upcycle: experts per token (--top-k)."""
    granularity: int = 1
    """upcycle: split each MLP into G experts (--granularity)."""
    router_init: str = "auto"
    """upcycle: auto, normal or virtual-group (--router-init)."""
    router: str = "softmax_topk_renorm"
    """upcycle: the MoE router (--router)."""
    every: int = 1
    """upcycle: layer i is MoE when (i+1) % every == 0; stack interleave-identity: insert
    after every n-th block (--every)."""
    method: str = "gstack"
    """stack: gstack, interleave-identity or dus (--method)."""
    factor: int = 2
    """stack gstack: repeat the stack this many times (--factor)."""
    layers: str = ""
    """stack dus: source layer ranges, e.g. 0:24,8:32 (--layers)."""
    freeze_old: bool = False
    """stack interleave-identity: train only the inserted blocks (--freeze-old)."""


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
