"""Importance correction against the rollout engine's log-probs: truncated (TIS) and masked (MIS /
IcePop) importance sampling, at token, sequence or geometric level.

The engine that sampled (SGLang, bf16 kernels) and the trainer that recomputes ``old_logp`` do not
agree exactly. The loss terms are reweighted by how much more likely the trainer's π_old finds the
sample than the engine did. With Δ_t = old_logp_t − rollout_logp_t on response tokens (m_t = 1):

    level       ratio ρ                                       one weight per
    token       ρ_t = exp(Δ_t)                                 token
    sequence    ρ_i = exp(Σ_t m_t Δ_t) = Π_t ρ_t                sequence   (TRL, verl, slime "sequence")
    geometric   ρ_i = exp((1/|y_i|) Σ_t m_t Δ_t)                sequence   (slime "geometric"; like GSPO's s_i)

    mode        weight w
    truncate    w = min(ρ, C)                                  TIS (Yao et al., 2025; TRL "*_truncate")
    mask        w = ρ if lo ≤ ρ ≤ C, else 0                    MIS / IcePop (TRL "*_mask", verl "lower_upper")

A masked term keeps its place in the normaliser (B, or the token count): it only gets weight 0, so
masking never rescales the other terms. The bounds are inclusive: ρ = C or ρ = lo is kept.
Weights are constants (detached): they change the measure, not the objective.

Overflow: Σ_t Δ_t over a long response can be large, so ρ is computed as exp(min(log ρ, 80)).
exp(80) ≈ 5.5e34 is finite even in float32, and for any C < e^80 the clamp changes nothing: a log-ratio
above 80 is above log C, so it is truncated to C or masked, exactly as without the clamp. The lower
side needs no clamp (exp underflows to 0). verl and slime clamp both sides at ±20 instead
(``SAFETY_BOUND``), which also changes truncated weights below e^-20.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The option names and lo's default are configuration (config/loss.py validates them); handed on here.
from luspo_megatron.config.loss import SEQUENCE_TIS_LEVELS, TIS_LEVELS, TIS_MODES, default_tis_lower

__all__ = ["LOG_RATIO_MAX", "SEQUENCE_TIS_LEVELS", "TIS_LEVELS", "TIS_MODES", "TisWeights", "default_tis_lower",
           "sequence_log_ratio", "tis_weights"]

LOG_RATIO_MAX = 80.0  # log ρ is clamped here before exp (module docstring); csrc/seq_logratio.h kLogRatioMax


class TisWeights(NamedTuple):
    """The weights of one level, and what happened to each term (all detached, same shape)."""

    weight: torch.Tensor  # w
    ratio: torch.Tensor  # ρ = exp(min(log ρ, LOG_RATIO_MAX)), before truncation or masking
    truncated: torch.Tensor  # bool: truncate mode and ρ > C (w = C)
    masked: torch.Tensor  # bool: mask mode and ρ ∉ [lo, C] (w = 0)


def sequence_log_ratio(sum_log_ratio: torch.Tensor, num_tokens: torch.Tensor, level: str) -> torch.Tensor:
    """log ρ_i, [B], from the per-sequence sums Σ_t m_t Δ_t and |y_i| (an empty sequence gets log ρ = 0)."""
    if level == "sequence":
        return sum_log_ratio  # log Π_t ρ_t
    if level == "geometric":
        return sum_log_ratio / num_tokens.clamp(min=1)  # (1/|y_i|) Σ_t m_t Δ_t
    raise ValueError(f"tis_level: expected one of {SEQUENCE_TIS_LEVELS} for a per-sequence ratio, got {level!r}")


def tis_weights(log_ratio: torch.Tensor, mode: str, clip: float, lower: float | None = None) -> TisWeights:
    """w for every term of ``log_ratio`` (log ρ, any shape) under ``mode`` with upper bound C = ``clip``
    and, for mask, lower bound ``lower`` (default 1/C)."""
    log_ratio = log_ratio.detach()
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))  # ρ; clamp keeps NaN as NaN
    if mode == "truncate":
        truncated = ratio > clip
        return TisWeights(torch.where(truncated, torch.full_like(ratio, clip), ratio), ratio, truncated,
                          torch.zeros_like(truncated))
    if mode == "mask":
        lo = default_tis_lower(clip) if lower is None else lower
        masked = (ratio < lo) | (ratio > clip)  # inclusive bounds: ρ = lo or ρ = C is kept
        return TisWeights(torch.where(masked, torch.zeros_like(ratio), ratio), ratio, torch.zeros_like(masked),
                          masked)
    raise ValueError(f"tis_mode: expected one of {TIS_MODES}, got {mode!r}")
