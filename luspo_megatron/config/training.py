"""The algorithm section (the RL objective) and the optimizer section (AdamW, schedule, batches)."""

from __future__ import annotations

from dataclasses import dataclass

from luspo_megatron.config.fields import check, flag_of, opt, positive, validate_fields
from luspo_megatron.config.loss import AGG_MODES, KL_TYPES, LOSS_NAMES, TIS_LEVELS, TIS_MODES, LossConfig
from luspo_megatron.errors import ConfigError


# ----------------------------------------------------------------------------------------- algorithm
@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL objective (docs/design.md §2). Clips default per loss; see config/loss.py DEFAULT_CLIPS."""

    loss: str = opt("luspo", "--loss", help="Policy loss.", choices=LOSS_NAMES)
    eps_clip: float | None = opt(None, "--eps-clip", help="ε_lo: lower clip of the ratio. Default per loss.")
    eps_clip_high: float | None = opt(None, "--eps-clip-high", help="ε_hi: upper clip (clip-higher).")
    agg: str | None = opt(
        None, "--loss-agg-mode", help="GRPO aggregation (default token-mean); fixed for gspo/luspo.", choices=AGG_MODES
    )
    kl_coef: float = opt(0.0, "--kl-loss-coef", help="β of the KL penalty against the reference model.")
    kl_type: str = opt("k3", "--kl-loss-type", help="KL estimator.", choices=KL_TYPES)
    entropy_coef: float = opt(0.0, "--entropy-coef", help="Entropy bonus coefficient.")
    use_tis: bool = opt(
        False, "--use-tis", action="store_true",
        help="Importance correction against the rollout engine's log-probs (docs/importance_sampling.md).",
    )
    tis_clip: float = opt(2.0, "--tis-clip", help="Upper bound C of the importance weight.")
    tis_level: str = opt(
        "token", "--tis-level", choices=TIS_LEVELS,
        help="token: ρ_t = exp(old_t − rollout_t); sequence: ρ_i = Π_t ρ_t (TRL, verl); "
             "geometric: (Π_t ρ_t)^(1/|y_i|), length-normalised.",
    )
    tis_mode: str = opt(
        "truncate", "--tis-mode", choices=TIS_MODES,
        help="truncate: w = min(ρ, C) (TIS); mask: w = ρ on [--tis-lower, --tis-clip], else 0 (MIS / IcePop).",
    )
    tis_lower: float | None = opt(None, "--tis-lower", help="Lower bound of --tis-mode mask; default 1/--tis-clip.")
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
    # Dynamic-sampling rounds and DAPO overlong shaping (trainer/rollout_step.py, algorithms/overlong.py).
    over_sampling_batch_size: int | None = opt(
        None, "--over-sampling-batch-size",
        help="With --dynamic-sampling: prompts generated per sampling round (slime's name); None: "
             "--rollout-batch-size. Kept groups beyond the batch go back to the prompt stream.",
    )
    overlong_buffer_len: int | None = opt(
        None, "--overlong-buffer-len",
        help="DAPO soft overlong punishment: L, the last L tokens before --rollout-max-response-len over which the "
             "reward falls linearly by up to --overlong-penalty-factor. None: off.",
    )
    overlong_penalty_factor: float = opt(
        1.0, "--overlong-penalty-factor", help="f of the overlong punishment: the penalty at the response limit."
    )
    overlong_filter: bool = opt(
        False, "--overlong-filter", action="store_true",
        help="DAPO overlong filtering: truncated responses (finish 'length') get a zero loss mask (still in B).",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(AlgorithmConfig, self, "n_samples_per_prompt", "max_dynamic_sampling_rounds")
        if self.over_sampling_batch_size is not None:
            positive(AlgorithmConfig, self, "over_sampling_batch_size")
        if self.overlong_buffer_len is not None:
            positive(AlgorithmConfig, self, "overlong_buffer_len")
        check(self.overlong_penalty_factor >= 0, AlgorithmConfig, "overlong_penalty_factor", "≥ 0",
              self.overlong_penalty_factor)
        try:
            self.loss_config()
        except ConfigError as err:  # the same rule, under this section's flag name
            raise ConfigError(f"{flag_of(AlgorithmConfig, err.field)}: {err.rule}", field=err.field,
                              rule=err.rule) from None
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
            tis_clip=self.tis_clip, tis_level=self.tis_level, tis_mode=self.tis_mode, tis_lower=self.tis_lower,
            max_response_len=max_response_len,
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
        None, "--num-steps-per-rollout",
        help="Optimizer steps per rollout: the rollout's P·G sequences are split into this many mini-batches "
             "(slime's flag; = P·G / --global-batch-size). None: P·G / --global-batch-size, or 1.",
    )
    max_tokens_per_micro_batch: int = opt(
        8192, "--max-tokens-per-micro-batch", help="Token budget of a packed micro-batch (per DP rank)."
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.lr > 0, OptimizerConfig, "lr", "> 0", self.lr)
        check(0 <= self.min_lr <= self.lr, OptimizerConfig, "min_lr", "0 ≤ min_lr ≤ lr", self.min_lr)
        check(self.lr_warmup_iters >= 0, OptimizerConfig, "lr_warmup_iters", "≥ 0", self.lr_warmup_iters)
        check(self.weight_decay >= 0, OptimizerConfig, "weight_decay", "≥ 0", self.weight_decay)
        check(self.clip_grad >= 0, OptimizerConfig, "clip_grad", "≥ 0", self.clip_grad)
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, OptimizerConfig, name, "a float in [0, 1)", getattr(self, name))
        check(self.adam_eps > 0, OptimizerConfig, "adam_eps", "> 0", self.adam_eps)
        for name in ("global_batch_size", "num_steps_per_rollout"):
            if getattr(self, name) is not None:
                positive(OptimizerConfig, self, name)
        positive(OptimizerConfig, self, "max_tokens_per_micro_batch")
