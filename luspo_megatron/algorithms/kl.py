"""Per-token KL estimators of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman, "Approximating KL
divergence", 2020). With log r = ref_logp − logp:

    k1 = −log r                 unbiased, high variance, can be negative
    k2 = ½ (log r)²             biased, low variance
    k3 = (r − 1) − log r        unbiased, low variance, ≥ 0   (GRPO's "low_var_kl")
"""

from __future__ import annotations

import torch

from luspo_megatron.config.loss import KL_TYPES  # the options live in config


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logp``, differentiable w.r.t. ``logp``."""
    log_r = ref_logp - logp
    if kl_type == "k1":
        return -log_r
    if kl_type == "k2":
        return 0.5 * log_r.square()
    if kl_type == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_type: expected one of {KL_TYPES}, got {kl_type!r}")
