"""DAPO's overlong reward shaping and overlong filtering (Yu et al., 2025, arXiv 2503.14476, §3.4).

Soft overlong punishment. With L_max the response limit (max_new_tokens), L the buffer (``--overlong-buffer-len``)
and f the factor (``--overlong-penalty-factor``), a response of |y| tokens gets the extra reward

    R_len(|y|) = 0                               |y| ≤ L_max − L
               = ((L_max − L) − |y|) / L · f     L_max − L < |y| ≤ L_max      (linear, from −f/L down to −f)
               = −f                              |y| > L_max

DAPO's Eq. 13 is this with f = 1 (L_cache for L). verl's DAPO reward manager
(verl/experimental/reward_loop/reward_manager/dapo.py, ``overlong_buffer_cfg.len`` / ``.penalty_factor``)
computes ``min(−(|y| − (L_max − L)) / L · f, 0)`` and adds it to the score: the same values for every
|y| ≤ L_max, which is every response an engine capped at L_max returns. Beyond L_max (impossible there) DAPO's
−1 is kept, scaled by f, where verl's line would keep decreasing.

Overlong filtering (``--overlong-filter``, DAPO §3.4): truncated responses (finish reason "length") get a
zero loss mask, so they carry no gradient; they still count in B (the trainer's job, not this module's).
"""

from __future__ import annotations

import torch

from luspo_megatron.errors import ConfigError


def check_overlong(max_response_len: int, buffer_len: int, penalty_factor: float) -> None:
    """One-line ConfigErrors for a bad configuration (verl asserts the same: 0 < L ≤ L_max)."""
    if not 0 < buffer_len <= max_response_len:
        raise ConfigError(f"overlong_buffer_len: expected 0 < L ≤ max_response_len = {max_response_len}, "
                          f"got {buffer_len}", field="overlong_buffer_len")
    if not penalty_factor >= 0:
        raise ConfigError(f"overlong_penalty_factor: expected ≥ 0, got {penalty_factor}",
                          field="overlong_penalty_factor")


def overlong_penalty(
    response_lengths: torch.Tensor, max_response_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """R_len(|y_i|) of the module docstring, [B] float64, ≤ 0, from the response lengths [B] (tokens)."""
    check_overlong(max_response_len, buffer_len, penalty_factor)
    length = response_lengths.to(torch.float64)
    expected = float(max_response_len - buffer_len)  # L_max − L: longest response without penalty
    linear = (expected - length) / buffer_len * penalty_factor  # ((L_max − L) − |y|) / L · f
    penalty = torch.where(length <= expected, torch.zeros_like(length), linear)
    return torch.where(length > max_response_len, torch.full_like(length, -float(penalty_factor)), penalty)


def apply_overlong_penalty(
    rewards: torch.Tensor, response_lengths: torch.Tensor, max_response_len: int, buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """rewards + R_len(|y|), [B] float64 (the shaped reward the advantages are computed from)."""
    assert rewards.shape == response_lengths.shape, (
        f"rewards, response_lengths: expected equal [B] shapes, got {tuple(rewards.shape)}, "
        f"{tuple(response_lengths.shape)}")
    return rewards.to(torch.float64) + overlong_penalty(response_lengths, max_response_len, buffer_len,
                                                        penalty_factor)


def overlong_metrics(penalty: torch.Tensor, truncated: torch.Tensor | None = None) -> dict[str, float]:
    """Counts of one step: ``overlong_shaped`` (responses with R_len < 0), its fraction, the mean R_len over
    all responses, and ``overlong_filtered`` (responses with a truncated finish, ``truncated`` [B] bool, when
    --overlong-filter zeroes their loss mask)."""
    n = max(penalty.numel(), 1)
    shaped = int((penalty < 0).sum())
    out = {
        "overlong_shaped": float(shaped),
        "overlong_shaped_frac": shaped / n,
        "overlong_penalty_mean": float(penalty.to(torch.float64).sum()) / n,
    }
    if truncated is not None:
        out["overlong_filtered"] = float(truncated.sum())
    return out
