"""Truncated importance sampling (TIS) against the rollout engine's log-probs.

The engine that sampled (SGLang, bf16 kernels) and the trainer that recomputes ``old_logp`` do not
agree exactly. TIS reweights each loss term by how much more likely the trainer's π_old finds the
sample than the engine did, truncated at C so a single token cannot dominate (Yao et al., 2025):

    token level:     w_t = min(exp(old_logp_t − rollout_logp_t), C)
    sequence level:  w_i = min(exp((1/|y_i|) Σ_t m_t (old_logp_t − rollout_logp_t)), C)

The sequence form is the geometric mean, like GSPO's s_i. Weights are constants (no gradient).
"""

from __future__ import annotations

import torch

from luspo_megatron.config.loss import TIS_LEVELS  # noqa: F401  (the options live in config)


def token_tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, clip: float) -> torch.Tensor:
    """w_t, [T]."""
    return torch.exp(old_logp - rollout_logp).clamp(max=clip).detach()


def sequence_tis_weights(
    sum_rollout_log_ratio: torch.Tensor, num_tokens: torch.Tensor, clip: float
) -> torch.Tensor:
    """w_i, [B], from the per-sequence sums Σ m (old − rollout) and |y_i| (empty sequences get 1)."""
    return torch.exp(sum_rollout_log_ratio / num_tokens.clamp(min=1)).clamp(max=clip).detach()
