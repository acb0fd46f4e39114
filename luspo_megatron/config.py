"""The run configuration: one tree of frozen dataclasses, loaded from YAML, then CLI flags.

Every field declares its flags (Megatron-LM names with short aliases, slime names for RL knobs),
its help text and its check in one place; the argparse parser and the YAML loader are generated
from the fields. Validation runs in ``__post_init__``, before any process group exists, and
raises :class:`~luspo_megatron.errors.ConfigError` with one line naming the flag, the value and
the rule. After validation a config never changes (``frozen=True``).

    cfg = load_config(["--config", "examples/tiny_cpu.yaml", "--tp", "2"])
    cfg.parallel.tensor_model_parallel_size  # 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from luspo_megatron.algorithms.kl import KL_TYPES
from luspo_megatron.algorithms.losses import AGG_MODES, LOSS_NAMES, LossConfig
from luspo_megatron.algorithms.tis import TIS_LEVELS
from luspo_megatron.errors import ConfigError


def opt(default: Any, *flags: str, help: str, choices: tuple | None = None, **meta: Any) -> Any:
    """A config field with its CLI flags. ``meta`` may hold ``action`` (e.g. "store_false" for a
    ``--disable-...`` flag of a True default) and ``nargs``."""
    kwargs: dict[str, Any] = {"metadata": {"flags": flags, "help": help, "choices": choices, **meta}}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are immutable")
    kwargs["default"] = default
    return field(**kwargs)


def flag_of(cls: type, name: str) -> str:
    """The primary CLI flag of a field, for error messages."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("flags"):
            return f.metadata["flags"][0]
    return name


def _check(ok: bool, cls: type, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag_of(cls, name)}: expected {rule}, got {value!r}", field=name)


def _positive(cls: type, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and value >= 1, cls, name, "a positive integer", value)


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    """Which network trains. Without ``hf_checkpoint`` a tiny Qwen3-MoE is built in code."""

    hf_checkpoint: str | None = opt(
        None, "--hf-checkpoint", help="Hugging Face model directory (config.json + safetensors) to start from."
    )
    preset: str = opt(
        "tiny_qwen3_moe", "--model-preset",
        help="Model built in code when no --hf-checkpoint is given (tiny test models).",
        choices=("tiny_qwen3_moe", "tiny_qwen3", "tiny_qwen25"),
    )
    dtype: str = opt("fp32", "--model-dtype", help="Parameter dtype.", choices=("fp32", "bf16"))
    vocab: str = opt(
        "task", "--model-vocab",
        help="Vocabulary of a preset model: task = the Qwen3 tokenizer restricted to the task's texts "
             "(fast on CPU); full = all 151,936 Qwen3 tokens.",
        choices=("task", "full"),
    )
    moe_aux_loss_coef: float | None = opt(
        None, "--moe-aux-loss-coeff", help="MoE load-balancing loss coefficient; None: the HF config's value."
    )
    use_transformer_engine: bool = opt(
        False, "--transformer-impl-te", help="Use Transformer Engine layer specs (GPU, needs the [gpu] extra).",
        action="store_true",
    )
    # --- issue 16: grouped experts, attention backend, activation recompute (models/megatron_config.py) ---
    moe_grouped_gemm: bool | None = opt(
        None, "--moe-grouped-gemm",
        help="All local experts of a MoE layer in one grouped GEMM (torch grouped_mm; models/experts.py) instead "
             "of one after another; same parameters and checkpoints. Unset: on with CUDA, off on a CPU; with "
             "Transformer Engine always TE's grouped GEMM. YAML false forces the sequential experts.",
        action="store_true",
    )
    attention_backend: str = opt(
        "auto", "--attention-backend",
        help="Core attention of the local spec (models/attention.py): auto (varlen on CUDA bf16 when it works, "
             "else causal; padded on CPU / fp32; the all-gather path with CP), padded (fp32, explicit mask), "
             "causal (input dtype, is_causal SDPA, no host sync), varlen (flash varlen on packed tokens; CUDA "
             "bf16), reference (dense O(T²), tests).",
        choices=("auto", "padded", "causal", "varlen", "reference"),
    )
    recompute_granularity: str | None = opt(
        None, "--recompute-granularity",
        help="Activation recompute: full (whole layers, needs --recompute-method and --recompute-num-layers) or "
             "selective (core attention of every layer). Unset: none.",
        choices=("full", "selective"),
    )
    recompute_method: str | None = opt(
        None, "--recompute-method",
        help="With --recompute-granularity full: uniform (chunks of N layers, all layers) or block (the first N "
             "layers of each pipeline stage).",
        choices=("uniform", "block"),
    )
    recompute_num_layers: int | None = opt(
        None, "--recompute-num-layers", help="N of --recompute-method (1 ≤ N ≤ layers per pipeline stage)."
    )
    # --- end of issue 16 block ---

    def __post_init__(self) -> None:
        if self.moe_aux_loss_coef is not None:
            _check(self.moe_aux_loss_coef >= 0, ModelConfig, "moe_aux_loss_coef", "≥ 0", self.moe_aux_loss_coef)
        # issue 16: the combinations megatron-core accepts (the layer-count bound needs the model:
        # models/megatron_config.recompute_options checks it).
        _check(self.attention_backend in ("auto", "padded", "causal", "varlen", "reference"), ModelConfig,
               "attention_backend", "one of auto, padded, causal, varlen, reference", self.attention_backend)
        _check(self.recompute_granularity in (None, "full", "selective"), ModelConfig, "recompute_granularity",
               "full or selective", self.recompute_granularity)
        _check(self.recompute_method in (None, "uniform", "block"), ModelConfig, "recompute_method",
               "uniform or block", self.recompute_method)
        full = self.recompute_granularity == "full"
        if full:
            _check(self.recompute_method is not None, ModelConfig, "recompute_method",
                   "uniform or block with --recompute-granularity full", self.recompute_method)
            _check(self.recompute_num_layers is not None, ModelConfig, "recompute_num_layers",
                   "a positive integer with --recompute-granularity full", self.recompute_num_layers)
            _positive(ModelConfig, self, "recompute_num_layers")
        else:
            rule = f"unset with --recompute-granularity {self.recompute_granularity}" if self.recompute_granularity \
                else "unset without --recompute-granularity full"
            _check(self.recompute_method is None, ModelConfig, "recompute_method", rule, self.recompute_method)
            _check(self.recompute_num_layers is None, ModelConfig, "recompute_num_layers", rule,
                   self.recompute_num_layers)


# ------------------------------------------------------------------------------------------ parallel
@dataclass(frozen=True)
class ParallelConfig:
    """Megatron-Core parallel layout. Data parallel is what is left: world / (tp·pp·cp)."""

    tensor_model_parallel_size: int = opt(1, "--tensor-model-parallel-size", "--tp", help="Tensor parallel size.")
    pipeline_model_parallel_size: int = opt(1, "--pipeline-model-parallel-size", "--pp", help="Pipeline stages.")
    virtual_pipeline_model_parallel_size: int | None = opt(
        None, "--virtual-pipeline-model-parallel-size", "--vpp", help="Model chunks per pipeline stage (interleaved)."
    )
    context_parallel_size: int = opt(1, "--context-parallel-size", "--cp", help="Context parallel size.")
    expert_model_parallel_size: int = opt(1, "--expert-model-parallel-size", "--ep", help="Expert parallel size.")
    expert_tensor_parallel_size: int | None = opt(
        None, "--expert-tensor-parallel-size", "--etp", help="Tensor parallel size inside experts; None: = tp."
    )
    sequence_parallel: bool = opt(
        False, "--sequence-parallel", help="Megatron sequence parallelism (forced on for MoE with tp > 1).",
        action="store_true",
    )
    use_distributed_optimizer: bool = opt(
        False, "--use-distributed-optimizer", help="Shard optimizer state over data parallel ranks.",
        action="store_true",
    )

    def __post_init__(self) -> None:
        _positive(
            ParallelConfig, self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "expert_model_parallel_size",
        )
        for name in ("virtual_pipeline_model_parallel_size", "expert_tensor_parallel_size"):
            if getattr(self, name) is not None:
                _positive(ParallelConfig, self, name)
        if self.virtual_pipeline_model_parallel_size not in (None, 1):
            _check(
                self.pipeline_model_parallel_size > 1, ParallelConfig, "virtual_pipeline_model_parallel_size",
                "--pp > 1 for interleaved pipelining", self.virtual_pipeline_model_parallel_size,
            )

    @property
    def model_parallel_size(self) -> int:
        """tp·pp·cp: the ranks one model replica spans (world size must be a multiple)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


# ------------------------------------------------------------------------------------------- rollout
@dataclass(frozen=True)
class RolloutConfig:
    """Where rollouts come from and how they are sampled (flags follow slime)."""

    engine: str = opt(
        "local", "--rollout-engine",
        help="local: start our SGLang-API server; sglang: external SGLang servers; inprocess: generate in the "
             "trainer's process (rank 0) with the same engine, no HTTP (CPU and toy models).",
        choices=("local", "sglang", "inprocess"),
    )
    sglang_url: tuple[str, ...] = opt((), "--sglang-url", help="SGLang server URLs (load-balanced).", nargs="+")
    sglang_router: str | None = opt(None, "--sglang-router", help="sglang-router URL (instead of --sglang-url).")
    num_engines: int = opt(1, "--rollout-num-engines", help="Local rollout servers to start.")
    rollout_batch_size: int = opt(8, "--rollout-batch-size", help="Prompts per rollout step (P).")
    max_response_len: int = opt(64, "--rollout-max-response-len", help="max_new_tokens of every response.")
    temperature: float = opt(1.0, "--rollout-temperature", help="Sampling temperature.")
    top_p: float = opt(1.0, "--rollout-top-p", help="Nucleus sampling threshold, in (0, 1].")
    top_k: int = opt(-1, "--rollout-top-k", help="Top-k sampling; -1 disables it.")
    max_concurrency: int = opt(64, "--rollout-max-concurrency", help="Requests in flight per server.")
    request_timeout_s: float = opt(600.0, "--rollout-request-timeout", help="Per-request timeout, seconds.")
    max_retries: int = opt(5, "--rollout-max-retries", help="Retries of a failed or aborted request.")
    weight_sync: str = opt(
        "disk", "--weight-sync", help="How new weights reach the engines.", choices=("disk", "distributed", "tensor")
    )
    update_weight_buffer_size: int = opt(
        512 * 1024**2, "--update-weight-buffer-size", help="Bucket size in bytes for weight sync."
    )
    use_rollout_logprobs: bool = opt(
        False, "--use-rollout-logprobs", help="Use the engine's log-probs as old_logp (skip the recompute).",
        action="store_true",
    )
    use_rollout_routing_replay: bool = opt(
        False, "--use-rollout-routing-replay", help="Replay the engine's MoE routing in training (R3).",
        action="store_true",
    )
    startup_timeout_s: float = opt(
        600.0, "--rollout-startup-timeout", help="Seconds to wait for every server's /health_generate at start."
    )
    local_device: str = opt("cpu", "--rollout-device", help="Device of the local rollout server: cpu or cuda[:N].")

    def __post_init__(self) -> None:
        _positive(RolloutConfig, self, "num_engines", "rollout_batch_size", "max_response_len", "max_concurrency")
        _check(self.startup_timeout_s > 0, RolloutConfig, "startup_timeout_s", "> 0", self.startup_timeout_s)
        _check(self.local_device == "cpu" or self.local_device.startswith("cuda"), RolloutConfig, "local_device",
               "cpu or cuda[:N]", self.local_device)
        _check(self.max_retries >= 0, RolloutConfig, "max_retries", "≥ 0", self.max_retries)
        _check(self.temperature > 0, RolloutConfig, "temperature", "> 0", self.temperature)
        _check(0 < self.top_p <= 1, RolloutConfig, "top_p", "a float in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 1, RolloutConfig, "top_k", "-1 or ≥ 1", self.top_k)
        _check(self.request_timeout_s > 0, RolloutConfig, "request_timeout_s", "> 0", self.request_timeout_s)
        _positive(RolloutConfig, self, "update_weight_buffer_size")
        if self.engine == "sglang":
            _check(
                bool(self.sglang_url) != bool(self.sglang_router), RolloutConfig, "sglang_url",
                "exactly one of --sglang-url or --sglang-router with --rollout-engine sglang",
                self.sglang_url or self.sglang_router,
            )
        if self.engine == "local":
            _check(self.weight_sync == "disk", RolloutConfig, "weight_sync", "disk for the local engine",
                   self.weight_sync)
        if self.engine == "inprocess":
            _check(self.weight_sync in ("disk", "tensor"), RolloutConfig, "weight_sync",
                   "disk or tensor for the inprocess engine", self.weight_sync)


# ----------------------------------------------------------------------------------------- algorithm
@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL objective (DESIGN.md §2). Clips default per loss; see algorithms.losses.DEFAULT_CLIPS."""

    loss: str = opt("luspo", "--loss", help="Policy loss.", choices=LOSS_NAMES)
    eps_clip: float | None = opt(None, "--eps-clip", help="ε_lo: lower clip of the ratio. Default per loss.")
    eps_clip_high: float | None = opt(None, "--eps-clip-high", help="ε_hi: upper clip (clip-higher).")
    agg: str | None = opt(
        None, "--loss-agg-mode", help="GRPO aggregation (default token-mean); fixed for gspo/luspo.", choices=AGG_MODES
    )
    kl_coef: float = opt(0.0, "--kl-loss-coef", help="β of the KL penalty against the reference model.")
    kl_type: str = opt("k3", "--kl-loss-type", help="KL estimator.", choices=KL_TYPES)
    entropy_coef: float = opt(0.0, "--entropy-coef", help="Entropy bonus coefficient.")
    use_tis: bool = opt(False, "--use-tis", help="Truncated importance sampling vs rollout log-probs.",
                        action="store_true")
    tis_clip: float = opt(2.0, "--tis-clip", help="TIS truncation C.")
    tis_level: str = opt("token", "--tis-level", help="TIS weight per token or per sequence.", choices=TIS_LEVELS)
    advantage_estimator: str = opt("grpo", "--advantage-estimator", help="Advantage estimator.", choices=("grpo",))
    std_normalize: bool = opt(
        True, "--disable-grpo-std-normalization", help="Do not divide advantages by the group std (Dr.GRPO).",
        action="store_false",
    )
    n_samples_per_prompt: int = opt(8, "--n-samples-per-prompt", help="Responses per prompt (group size G).")
    dynamic_sampling: bool = opt(
        False, "--dynamic-sampling", help="DAPO: drop groups with equal rewards and refill from more prompts.",
        action="store_true",
    )
    max_dynamic_sampling_rounds: int = opt(
        4, "--max-dynamic-sampling-rounds", help="Bound on extra rollout rounds to refill dropped groups."
    )
    log_ref_kl: bool = opt(
        False, "--log-ref-kl", help="Keep a reference model to log KL to it even when --kl-loss-coef is 0.",
        action="store_true",
    )

    def __post_init__(self) -> None:
        _positive(AlgorithmConfig, self, "n_samples_per_prompt", "max_dynamic_sampling_rounds")
        try:
            self.loss_config()
        except ConfigError as err:  # re-word with this section's flag names
            name = err.field or "loss"
            rule = str(err).split(": ", 1)[-1]
            raise ConfigError(f"{flag_of(AlgorithmConfig, name)}: {rule}", field=name) from None
        if self.n_samples_per_prompt < 2:
            raise ConfigError(
                f"--n-samples-per-prompt: expected ≥ 2 for group advantages, got {self.n_samples_per_prompt}",
                field="n_samples_per_prompt",
            )

    def loss_config(self, max_response_len: int | None = None) -> LossConfig:
        """The validated :class:`LossConfig` this section describes."""
        return LossConfig(
            name=self.loss, eps_clip=self.eps_clip, eps_clip_high=self.eps_clip_high, agg=self.agg,
            kl_coef=self.kl_coef, kl_type=self.kl_type, entropy_coef=self.entropy_coef, use_tis=self.use_tis,
            tis_clip=self.tis_clip, tis_level=self.tis_level, max_response_len=max_response_len,
        )


# ----------------------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and the schedule. Defaults follow the LUSPO paper: lr 1e-6 constant after 20 warm-up steps."""

    lr: float = opt(1e-6, "--lr", help="Peak learning rate.")
    min_lr: float = opt(0.0, "--min-lr", help="Final learning rate of the cosine schedule.")
    lr_warmup_iters: int = opt(20, "--lr-warmup-iters", help="Linear warm-up, in optimizer steps.")
    lr_decay_style: str = opt("constant", "--lr-decay-style", help="After warm-up.", choices=("constant", "cosine"))
    weight_decay: float = opt(0.1, "--weight-decay", help="AdamW weight decay.")
    clip_grad: float = opt(1.0, "--clip-grad", help="Global grad-norm clip; 0 disables it.")
    adam_beta1: float = opt(0.9, "--adam-beta1", help="Adam β1.")
    adam_beta2: float = opt(0.98, "--adam-beta2", help="Adam β2.")
    adam_eps: float = opt(1e-8, "--adam-eps", help="Adam ε.")
    global_batch_size: int | None = opt(
        None, "--global-batch-size", help="Sequences per optimizer step; None: the whole rollout batch (P·G)."
    )
    num_steps_per_rollout: int | None = opt(
        None, "--num-steps-per-rollout", help="Optimizer steps per rollout; None: P·G / global batch."
    )
    max_tokens_per_micro_batch: int = opt(
        8192, "--max-tokens-per-micro-batch", help="Token budget of a packed micro-batch (per DP rank)."
    )

    def __post_init__(self) -> None:
        _check(self.lr > 0, OptimizerConfig, "lr", "> 0", self.lr)
        _check(0 <= self.min_lr <= self.lr, OptimizerConfig, "min_lr", "0 ≤ min_lr ≤ lr", self.min_lr)
        _check(self.lr_warmup_iters >= 0, OptimizerConfig, "lr_warmup_iters", "≥ 0", self.lr_warmup_iters)
        _check(self.weight_decay >= 0, OptimizerConfig, "weight_decay", "≥ 0", self.weight_decay)
        _check(self.clip_grad >= 0, OptimizerConfig, "clip_grad", "≥ 0", self.clip_grad)
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, OptimizerConfig, name, "a float in [0, 1)", getattr(self, name))
        _check(self.adam_eps > 0, OptimizerConfig, "adam_eps", "> 0", self.adam_eps)
        for name in ("global_batch_size", "num_steps_per_rollout"):
            if getattr(self, name) is not None:
                _positive(OptimizerConfig, self, name)
        _positive(OptimizerConfig, self, "max_tokens_per_micro_batch")


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """Prompts. Without ``prompt_data`` the built-in synthetic arithmetic task is used."""

    prompt_data: str | None = opt(None, "--prompt-data", help="JSONL or Parquet prompt file.")
    input_key: str = opt("prompt", "--input-key", help="Column with the prompt (text or chat messages).")
    label_key: str = opt(
        "reward_model.ground_truth", "--label-key", help="Column with the ground truth (dotted path allowed)."
    )
    metadata_key: str | None = opt(None, "--metadata-key", help="Column passed to the reward as metadata.")
    max_prompt_len: int = opt(512, "--max-prompt-len", help="Prompts longer than this (tokens) are filtered out.")
    apply_chat_template: bool = opt(
        True, "--no-chat-template", help="Feed prompts raw, without the tokenizer's chat template.",
        action="store_false",
    )
    enable_thinking: bool = opt(False, "--enable-thinking", help="Qwen3 chat template thinking mode.",
                                action="store_true")
    skip_bad_rows: bool = opt(False, "--skip-bad-rows", help="Count and skip rows that fail to parse.",
                              action="store_true")
    reward: str = opt("math", "--reward", help="Reward function.", choices=("math", "math+format"))
    custom_reward_path: str | None = opt(
        None, "--custom-reward-path", help="module:function computing the reward instead of --reward."
    )
    reward_timeout_s: float = opt(5.0, "--reward-timeout", help="Per-item reward timeout, seconds.")
    sft_key: str = opt("solution", "--sft-key", help="Column with the reference response for --sft-warmup-steps.")
    sft_direct_fraction: float = opt(
        0.0, "--sft-direct-fraction",
        help="Fraction of warm-up targets taken from the `direct_solution` column (the bare answer) instead of "
             "--sft-key: the warm-up then teaches both a long and a short way to answer, and RL chooses.",
    )
    format_reward_weight: float = opt(0.1, "--format-reward-weight", help="Weight of the format term in math+format.")
    reward_num_workers: int = opt(2, "--reward-num-workers", help="Processes scoring rewards (math-verify).")
    tokenizer_path: str | None = opt(
        None, "--tokenizer-path", help="HF tokenizer directory; None: the Qwen3 tokenizer (offline, built in)."
    )
    synthetic_num_prompts: int = opt(
        4096, "--synthetic-num-prompts", help="Prompts of the built-in arithmetic task (without --prompt-data)."
    )
    synthetic_max_steps: int = opt(8, "--synthetic-max-steps", help="Hardest arithmetic level (operations).")
    synthetic_sft_prompts: int = opt(
        0, "--synthetic-sft-prompts",
        help="Rows of the built-in task the SFT warm-up trains on (the same seeded draw, extended: the RL prompts "
             "are its first rows); 0: the RL prompts. A larger pool keeps the warm-up from memorising the RL "
             "prompts' answers.",
    )

    def __post_init__(self) -> None:
        _positive(DataConfig, self, "max_prompt_len", "reward_num_workers", "synthetic_num_prompts",
                  "synthetic_max_steps")
        _check(self.format_reward_weight >= 0, DataConfig, "format_reward_weight", "≥ 0", self.format_reward_weight)
        _check(self.reward_timeout_s > 0, DataConfig, "reward_timeout_s", "> 0", self.reward_timeout_s)
        _check(self.synthetic_sft_prompts >= 0, DataConfig, "synthetic_sft_prompts", "≥ 0 (0: the RL prompts)",
               self.synthetic_sft_prompts)
        _check(0.0 <= self.sft_direct_fraction <= 1.0, DataConfig, "sft_direct_fraction", "a fraction in [0, 1]",
               self.sft_direct_fraction)
        if self.custom_reward_path is not None:
            _check(":" in self.custom_reward_path, DataConfig, "custom_reward_path", "module:function",
                   self.custom_reward_path)


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

    def __post_init__(self) -> None:
        for name in ("save_interval", "keep_last"):
            if getattr(self, name) is not None:
                _positive(CheckpointConfig, self, name)
        if self.ckpt_step is not None:
            _check(isinstance(self.ckpt_step, int) and self.ckpt_step >= 0, CheckpointConfig, "ckpt_step",
                   "a non-negative integer", self.ckpt_step)


# ------------------------------------------------------------------------------------------- logging
@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str = opt("runs/latest", "--log-dir", help="metrics.jsonl, TensorBoard events, samples and plots.")
    wandb_project: str | None = opt(None, "--wandb-project", help="Also log to wandb (when installed).")
    sample_interval: int = opt(10, "--sample-log-interval", help="Write a few samples every N steps.")
    samples_per_step: int = opt(3, "--samples-per-step", help="Samples written per logged step; -1: all of them.")
    progress: bool = opt(True, "--no-progress", help="Disable the progress bar.", action="store_false")

    def __post_init__(self) -> None:
        _positive(LoggingConfig, self, "sample_interval")
        _check(self.samples_per_step == -1 or self.samples_per_step >= 1, LoggingConfig, "samples_per_step",
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
}


@dataclass(frozen=True)
class RunConfig:
    """The whole run. ``train_iters`` counts RL steps (rollout + its optimizer steps)."""

    train_iters: int = opt(20, "--train-iters", help="RL steps to run.")
    seed: int = opt(1234, "--seed", help="Seeds torch, numpy, random, Megatron's RNG tracker, data and sampling.")
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

    def __post_init__(self) -> None:
        _positive(RunConfig, self, "train_iters")
        _check(self.sft_warmup_steps >= 0, RunConfig, "sft_warmup_steps", "≥ 0", self.sft_warmup_steps)
        _check(self.sft_lr > 0, RunConfig, "sft_lr", "> 0", self.sft_lr)
        _positive(RunConfig, self, "sft_batch_size")
        batch = self.rollout.rollout_batch_size * self.algorithm.n_samples_per_prompt
        gbs = self.optimizer.global_batch_size
        if gbs is not None and batch % gbs != 0:
            raise ConfigError(
                f"--global-batch-size: expected a divisor of the rollout batch "
                f"(--rollout-batch-size × --n-samples-per-prompt = {batch}), got {gbs}",
                field="global_batch_size",
            )

    @property
    def sequences_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.algorithm.n_samples_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ loading and parsing
def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field annotation such as ``int | None``."""
    hint = annotation
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise a one-line ConfigError."""
    hint, optional = _base_type(_field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected a value, got null", field=name)
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(str(v) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    type_name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {type_name}, got {value!r}", field=name)


def _section_values(cls: type, raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {cls.__name__} keys, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{path}.{key}: unknown key; expected one of {sorted(names)}", field=str(key))
        out[key] = _coerce(cls, key, value, f"{flag_of(cls, key)} ({path}.{key})")
    return out


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a nested dict (the YAML layout)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    top_names = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS)
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            sections[key] = SECTIONS[key](**_section_values(SECTIONS[key], value, key))
        elif key in top_names:
            top[key] = _coerce(RunConfig, key, value, f"{flag_of(RunConfig, key)} ({key})")
        else:
            raise ConfigError(
                f"{source}: unknown key {key!r}; expected one of {sorted(top_names | set(SECTIONS))}", field=str(key)
            )
    return RunConfig(**top, **sections)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}", field="config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"--config: {path} is not valid YAML{line}", field="config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping, got {type(raw).__name__}", field="config")
    return raw


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (and exits 2), like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_field(group: argparse._ArgumentGroup, cls: type, f: dataclasses.Field, dest: str) -> None:
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": meta["help"]}
    action = meta.get("action")
    if action in ("store_true", "store_false"):
        kwargs["action"] = action
    else:
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        hint, _ = _base_type(_field_types(cls)[f.name])
        kwargs["metavar"] = f.name.upper() if not meta.get("choices") else None
        kwargs["help"] += f" (default: {f.default})" if f.default is not dataclasses.MISSING else ""
    group.add_argument(*meta["flags"], **kwargs)


def build_parser(prog: str = "train_luspo.py", description: str | None = None) -> OneLineArgumentParser:
    """The CLI: ``--config`` plus one flag per config field, grouped by section."""
    parser = OneLineArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config; flags given on the command line override it.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    run_group = parser.add_argument_group("run")
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            _add_field(run_group, RunConfig, f, f.name)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            _add_field(group, cls, f, f"{section}.{f.name}")
    return parser


def merge_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{"section.field": value}`` CLI overrides onto the nested YAML dict."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dest, value in overrides.items():
        if "." in dest:
            section, name = dest.split(".", 1)
            merged.setdefault(section, {})
            if not isinstance(merged[section], dict):
                raise ConfigError(f"config: {section} must be a mapping")
            merged[section][name] = value
        else:
            merged[dest] = value
    return merged


def load_config(
    argv: list[str] | None = None, default_config: str | Path | None = None
) -> tuple[RunConfig, argparse.Namespace]:
    """Parse ``argv``: the YAML of ``--config`` (or ``default_config``), then the flags over it."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    config_path = args.config or default_config
    raw = load_yaml(config_path) if config_path else {}
    return config_from_dict(merge_overrides(raw, overrides), source=str(config_path or "flags")), args


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(
        json_ready(config.to_dict()), sort_keys=False, default_flow_style=False
    )


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [json_ready(v) for v in value]
    return value
