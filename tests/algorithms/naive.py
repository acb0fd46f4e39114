"""An independent, deliberately naive float64 oracle of docs/design.md §2, written from the table, one
sequence at a time in a Python loop. It shares no code with luspo_megatron.algorithms."""

from __future__ import annotations

import math

import torch


def naive_kl(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    return torch.exp(ref - logp) - (ref - logp) - 1.0  # k3


def naive_tis_weight(log_ratio: float, mode: str, clip: float, lower: float | None) -> float:
    """The importance weight of one term from its log-ratio, straight from the definitions:
    truncate min(ρ, C); mask ρ if lo ≤ ρ ≤ C else 0 (lo defaults to 1/C). ρ = e^x may be inf here."""
    rho = math.exp(log_ratio) if log_ratio < 700 else math.inf
    if mode == "truncate":
        return min(rho, clip)
    lo = 1.0 / clip if lower is None else lower
    return rho if lo <= rho <= clip else 0.0


def naive_policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cu: list[int],
    *,
    name: str,
    eps_lo: float,
    eps_hi: float,
    agg: str,
    num_sequences: int,
    num_tokens: float | None = None,
    max_len: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    ref: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    tis: str | None = None,
    tis_clip: float = 2.0,
    rollout: torch.Tensor | None = None,
    tis_mode: str = "truncate",
    tis_lower: float | None = None,
) -> torch.Tensor:
    B = num_sequences
    per_token_adv = adv.numel() != len(cu) - 1
    N = float(mask.sum()) if num_tokens is None else float(num_tokens)
    total = logp.new_zeros(())
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        m = mask[a:b]
        n = float(m.sum())
        if n == 0:
            continue  # an empty response contributes nothing (and must not be NaN)
        lp, o = logp[a:b], old[a:b]
        s = torch.exp(((lp - o) * m).sum() / n)
        if tis in ("sequence", "geometric"):
            log_rho = sum(float(o[t] - rollout[a + t]) for t in range(b - a) if m[t] != 0)  # log Π_t ρ_t
            if tis == "geometric":
                log_rho /= n
            w_seq = naive_tis_weight(log_rho, tis_mode, tis_clip, tis_lower)
        seq_sum = logp.new_zeros(())
        for t in range(b - a):
            if m[t] == 0:
                continue
            A = adv[a + t] if per_token_adv else adv[i]
            if name == "grpo":
                ratio = torch.exp(lp[t] - o[t])
            elif name == "gspo_token":
                ratio = s.detach() * torch.exp(lp[t] - lp[t].detach())
            else:
                ratio = s
            term = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * A)
            if tis == "token":
                term = term * naive_tis_weight(float(o[t] - rollout[a + t]), tis_mode, tis_clip, tis_lower)
            elif tis in ("sequence", "geometric"):
                term = term * w_seq
            if kl_coef:
                term = term + kl_coef * naive_kl(lp[t], ref[a + t], kl_type)
            if entropy_coef:
                term = term - entropy_coef * entropy[a + t]
            seq_sum = seq_sum + term
        if agg == "token-mean":
            total = total + seq_sum / N
        elif agg == "seq-mean-token-mean":
            total = total + seq_sum / n / B
        elif agg == "seq-mean-token-sum":
            total = total + seq_sum / B
        elif agg == "seq-mean-token-sum-norm":
            total = total + seq_sum / (B * max_len)
        else:
            raise AssertionError(agg)
    return total
