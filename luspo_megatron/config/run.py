"""The checkpoint and logging sections, and the root :class:`RunConfig` that holds every section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from luspo_megatron.config.data import DataConfig
from luspo_megatron.config.eval import EvalConfig
from luspo_megatron.config.fields import check, opt, positive, validate_fields
from luspo_megatron.config.model import ModelConfig, ParallelConfig
from luspo_megatron.config.rollout import RolloutConfig
from luspo_megatron.config.training import AlgorithmConfig, OptimizerConfig
from luspo_megatron.errors import ConfigError


# ---------------------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints (Megatron dist_checkpointing, atomic commit)."""

    load: str | None = opt(None, "--load", help="Checkpoint directory to resume from (its `latest`).")
    save: str | None = opt(None, "--save", help="Checkpoint directory to save to.")
    save_interval: int | None = opt(None, "--save-interval", help="Save every N RL steps (and at the end).")
    keep_last: int | None = opt(None, "--keep-last", help="Keep only the newest N checkpoints.")
    ckpt_step: int | None = opt(
        None, "--ckpt-step", help="Resume from this step of --load instead of its `latest`."
    )
    pretrained_checkpoint: str | None = opt(
        None, "--pretrained-checkpoint",
        help="dist checkpoint (e.g. from tools/convert_hf_to_megatron.py) whose weights start the run "
             "when --load has nothing to resume.",
    )
    no_load_optim: bool = opt(
        False, "--no-load-optim", help="Resume without the optimizer state (fresh Adam moments).",
        action="store_true",
    )
    no_load_rng: bool = opt(False, "--no-load-rng", help="Resume without the RNG states.", action="store_true")
    verify_checkpoint: bool = opt(
        True, "--no-verify-checkpoint", action="store_false",
        help="Load without checking every checkpoint file against the sha256 recorded at save "
             "(saves a full read of the checkpoint on huge runs; a damaged file then loads silently).",
    )
    load_if_exists: bool = opt(
        False, "--load-if-exists", action="store_true",
        help="Start fresh when the --load directory does not exist (without it, that is an error).",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        for name in ("save_interval", "keep_last"):
            if getattr(self, name) is not None:
                positive(CheckpointConfig, self, name)
        if self.ckpt_step is not None:
            check(isinstance(self.ckpt_step, int) and self.ckpt_step >= 0, CheckpointConfig, "ckpt_step",
                   "a non-negative integer", self.ckpt_step)


# ------------------------------------------------------------------------------------------- logging
@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str = opt("runs/latest", "--log-dir", help="metrics.jsonl, TensorBoard events, samples and plots.")
    wandb_project: str | None = opt(None, "--wandb-project", help="Also log to wandb (when installed).")
    sample_interval: int = opt(10, "--sample-log-interval", help="Write a few samples every N steps.")
    samples_per_step: int = opt(3, "--samples-per-step", help="Samples written per logged step; -1: all of them.")
    progress: bool = opt(True, "--no-progress", help="Disable the progress bar.", action="store_false")
    log_interval: int = opt(
        1, "--log-interval",
        help="When stdout is not a terminal (a log file, CI, nohup), print a progress line every N RL steps.",
    )
    dump_step_tensors: str | None = opt(
        None, "--dump-step-tensors",
        help="Debug: write every optimizer step's packed tensors (tokens, masks, advantages, the current, old, "
             "rollout and reference log-probs) and its metrics to DIR/step{S}_opt{K}.pt on rank 0 (its data-"
             "parallel share). Costs one extra forward pass per optimizer step.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(LoggingConfig, self, "sample_interval", "log_interval")
        check(self.samples_per_step == -1 or self.samples_per_step >= 1, LoggingConfig, "samples_per_step",
               "-1 or ≥ 1", self.samples_per_step)


# ---------------------------------------------------------------------------------------------- root
SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "rollout": RolloutConfig,
    "algorithm": AlgorithmConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """The whole run. ``train_iters`` counts RL steps (rollout + its optimizer steps)."""

    train_iters: int = opt(20, "--train-iters", help="RL steps to run.")
    seed: int = opt(1234, "--seed", low=0, high=2**32 - 1,  # numpy's seeds: [0, 2**32)
                    help="Seeds torch, numpy, random, Megatron's RNG tracker, data and sampling; in [0, 2**32).")
    sft_warmup_steps: int = opt(0, "--sft-warmup-steps", help="Supervised warm-up steps before RL.")
    sft_lr: float = opt(1e-3, "--sft-lr", help="Learning rate of the supervised warm-up (its own AdamW).")
    sft_batch_size: int = opt(64, "--sft-batch-size", help="Sequences per supervised warm-up step.")
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(RunConfig, self, "train_iters")
        # Pipeline stage s seeds numpy with seed + 100·s (parallel/state.set_seeds): that too must be < 2**32.
        last_stage = self.parallel.pipeline_model_parallel_size - 1
        check(self.seed + 100 * last_stage < 2**32, RunConfig, "seed",
              f"an integer in [0, 2**32 - 100·{last_stage}) with --pp {last_stage + 1} (stage s seeds seed + 100·s)",
              self.seed)
        check(self.sft_warmup_steps >= 0, RunConfig, "sft_warmup_steps", "≥ 0", self.sft_warmup_steps)
        check(self.sft_lr > 0, RunConfig, "sft_lr", "> 0", self.sft_lr)
        positive(RunConfig, self, "sft_batch_size")
        batch = self.rollout.rollout_batch_size * self.algorithm.n_samples_per_prompt
        gbs = self.optimizer.global_batch_size
        if gbs is not None and batch % gbs != 0:
            raise ConfigError(
                f"--global-batch-size: expected a divisor of the rollout batch "
                f"(--rollout-batch-size × --n-samples-per-prompt = {batch}), got {gbs}",
                field="global_batch_size",
            )
        # A sequence is never split across micro-batches: the longest one must fit the budget, checked
        # here rather than at the first long sample, deep into a run.
        longest = self.data.max_prompt_len + self.rollout.max_response_len
        if longest > self.optimizer.max_tokens_per_micro_batch:
            raise ConfigError(
                f"--max-tokens-per-micro-batch: expected ≥ --max-prompt-len + --rollout-max-response-len = "
                f"{self.data.max_prompt_len} + {self.rollout.max_response_len} = {longest} (a sequence is never "
                f"split across micro-batches), got {self.optimizer.max_tokens_per_micro_batch}",
                field="max_tokens_per_micro_batch",
            )
        # Off-policy mini-batches and overlong shaping (trainer/policy_step.py, trainer/rollout_step.py).
        steps = self.optimizer.num_steps_per_rollout
        if steps is not None and batch % steps != 0:
            raise ConfigError(
                f"--num-steps-per-rollout: expected a divisor of the rollout batch "
                f"(--rollout-batch-size × --n-samples-per-prompt = {batch}), got {steps}",
                field="num_steps_per_rollout",
            )
        if steps is not None and gbs is not None and gbs * steps != batch:
            raise ConfigError(
                f"--global-batch-size {gbs} and --num-steps-per-rollout {steps} disagree: expected their product to "
                f"be the rollout batch (--rollout-batch-size × --n-samples-per-prompt = {batch}), got {gbs * steps}",
                field="num_steps_per_rollout",
            )
        buffer_len = self.algorithm.overlong_buffer_len
        if buffer_len is not None and buffer_len > self.rollout.max_response_len:
            raise ConfigError(
                f"--overlong-buffer-len: expected ≤ --rollout-max-response-len = {self.rollout.max_response_len}, "
                f"got {buffer_len}", field="overlong_buffer_len",
            )

    @property
    def sequences_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.algorithm.n_samples_per_prompt

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """N: the optimizer steps of a full rollout batch (--num-steps-per-rollout, else P·G / gbs, else 1)."""
        if self.optimizer.num_steps_per_rollout is not None:
            return self.optimizer.num_steps_per_rollout
        gbs = self.optimizer.global_batch_size
        return self.sequences_per_rollout // gbs if gbs else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
