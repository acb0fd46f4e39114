"""Step metrics of docs/design.md §2, and how to combine them across micro-batches and ranks.

Every metric is a plain float. Means carry the count they average over (``num_tokens`` for token
means, ``num_seqs`` for sequence means, ``tis_num_terms`` for the TIS fractions) so that
``reduce_metrics`` can combine micro-batches exactly; ``loss`` and ``pg_loss`` are already fractions
of the global step loss and add up; maxima combine by max.

Importance correction (``use_tis``, algorithms/tis.py), over the terms of the configured level (response
tokens at token level, non-empty sequences at sequence / geometric level):

    tis_weight_mean     token mean of w
    tis_truncated_frac  fraction of terms with ρ > C (truncate mode)
    tis_masked_frac     fraction of terms with ρ ∉ [lo, C] (mask mode)
    tis_ratio_max       max ρ (before truncation or masking; log ρ clamped at tis.LOG_RATIO_MAX)
    tis_num_terms       the count the two fractions average over (with CP > 1 at a sequence level,
                        every CP rank counts the same sequences)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from luspo_megatron.algorithms.mismatch import PARTIAL_MAX_KEYS, PARTIAL_SUM_KEYS
from luspo_megatron.config.loss import LossConfig

if TYPE_CHECKING:
    from luspo_megatron.algorithms.tis import TisWeights

# How each key combines over micro-batches / ranks: summed, or averaged weighted by a count key.
SUMMED = ("loss", "pg_loss", "num_tokens", "num_seqs", "num_empty_seqs", "num_clipped", "tis_num_terms",
          *PARTIAL_SUM_KEYS)
TOKEN_MEANS = ("mean_abs_log_ratio", "kl", "entropy", "tis_weight_mean", "token_clip_frac")
SEQ_MEANS = ("clip_frac", "seq_ratio_mean", "length_weight_share")
TIS_TERM_MEANS = ("tis_truncated_frac", "tis_masked_frac")  # weighted by tis_num_terms
MAXED = ("tis_ratio_max", *PARTIAL_MAX_KEYS)


def length_weight_share(seq_grad_weight: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
    """Fraction of the total gradient weight Σ_t |∂L/∂logp_t| that falls on sequences longer than
    the median length: the length-bias diagnostic. A length-unbiased loss puts per-token weight
    independent of length, so long sequences carry most of it; GSPO's 1/|y_i| per token pulls the
    share down. 0 when there is no gradient weight. Returns a 0-dim tensor (no host sync)."""
    if seq_len.numel() == 0:
        return seq_grad_weight.new_zeros(())
    total = seq_grad_weight.sum()
    longer = (seq_len > seq_len.median()).to(seq_grad_weight.dtype)
    return torch.where(total > 0, (seq_grad_weight * longer).sum() / total.clamp(min=1e-300), total.new_zeros(()))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def policy_loss_metrics(
    *,
    config: LossConfig,
    loss: torch.Tensor,
    pg_loss: torch.Tensor,
    mask: torch.Tensor,
    seg: torch.Tensor,
    seq_len: torch.Tensor,
    log_seq_ratio: torch.Tensor,
    delta: torch.Tensor,
    clipped_t: torch.Tensor,
    seq_clipped: torch.Tensor | None,
    grad_weight_t: torch.Tensor,
    tis_w_t: torch.Tensor | None,
    kl_t: torch.Tensor | None,
    entropy_t: torch.Tensor | None,
    tis: "TisWeights | None" = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> dict[str, float]:
    """Metrics of one ``policy_loss`` call (local tokens; sequence lengths are CP-global). ``tis``: the
    importance weights of the configured level, [T] at token level, [B] at a sequence level.

    Everything is computed as 0-dim tensors and moved to the host in one transfer."""
    num_seqs = seq_len.numel()
    nonempty = (seq_len > 0).to(mask.dtype)
    n_nonempty = nonempty.sum()
    out: dict[str, torch.Tensor] = {
        "loss": loss.detach(),
        "pg_loss": pg_loss.detach(),
        "num_tokens": mask.sum(),
        "num_seqs": mask.new_tensor(float(num_seqs)),
        "num_empty_seqs": num_seqs - n_nonempty,
        "mean_abs_log_ratio": _masked_mean(delta.abs(), mask),
        "token_clip_frac": _masked_mean(clipped_t.to(mask.dtype), mask),
    }
    if seq_clipped is not None:
        # Sequence-level losses clip whole sequences: the fraction of non-empty sequences.
        out["num_clipped"] = (seq_clipped.to(mask.dtype) * nonempty).sum()
        out["clip_frac"] = out["num_clipped"] / n_nonempty.clamp(min=1)
        out["seq_ratio_mean"] = (torch.exp(log_seq_ratio) * nonempty).sum() / n_nonempty.clamp(min=1)
    else:
        out["num_clipped"] = (clipped_t.to(mask.dtype) * mask).sum()
        out["clip_frac"] = out["token_clip_frac"]
    if tis_w_t is not None:
        out["tis_weight_mean"] = _masked_mean(tis_w_t, mask)
        # The terms: response tokens (weighted by m_t, like every token count) or non-empty sequences.
        terms = mask if config.tis_level == "token" else nonempty
        out["tis_num_terms"] = terms.sum()
        out["tis_truncated_frac"] = _masked_mean(tis.truncated.to(mask.dtype), terms)
        out["tis_masked_frac"] = _masked_mean(tis.masked.to(mask.dtype), terms)
        # max over the terms; 0 when there is none (every ρ > 0, so 0 is neutral under max)
        kept_ratio = torch.where(terms > 0, tis.ratio, torch.zeros_like(tis.ratio))
        out["tis_ratio_max"] = kept_ratio.max() if terms.numel() else mask.new_zeros(())
    if kl_t is not None:
        out["kl"] = _masked_mean(kl_t, mask)
    if entropy_t is not None:
        out["entropy"] = _masked_mean(entropy_t, mask)
    seq_grad = grad_weight_t.new_zeros(num_seqs + 1).index_add(0, seg, grad_weight_t)[:num_seqs]
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(seq_grad, group=cp_group)
    out["length_weight_share"] = length_weight_share(seq_grad, seq_len)
    keys = list(out)
    values = torch.stack([out[k].to(torch.float64) for k in keys]).tolist()
    return dict(zip(keys, values))


def metrics_from_table(
    *,
    config: LossConfig,
    loss: torch.Tensor,
    table: torch.Tensor,
    seq_len: torch.Tensor,
    has_kl: bool,
    entropy_mean: torch.Tensor | None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> dict[str, float]:
    """``policy_loss_metrics`` (same keys, same meaning) from the fused op's per-sequence table
    (``luspo_megatron.ops.fused_policy_loss.TABLE_COLUMNS``), whose columns are summed in a fixed order."""
    from luspo_megatron.ops.fused_policy_loss import COL

    totals = table.sum(dim=0)
    col = {name: totals[j] for name, j in COL.items()}
    tokens = col["tokens"]
    num_seqs = seq_len.numel()
    n_nonempty = col["nonempty"]

    def token_mean(name: str) -> torch.Tensor:
        return col[name] / tokens.clamp(min=1)

    out: dict[str, torch.Tensor] = {
        "loss": loss.detach(),
        "pg_loss": col["pg_loss"],
        "num_tokens": tokens,
        "num_seqs": tokens.new_tensor(float(num_seqs)),
        "num_empty_seqs": num_seqs - n_nonempty,
        "mean_abs_log_ratio": token_mean("abs_delta"),
        "token_clip_frac": token_mean("clipped_tokens"),
    }
    if config.sequence_level:
        out["num_clipped"] = col["seq_clipped"]
        out["clip_frac"] = out["num_clipped"] / n_nonempty.clamp(min=1)
        out["seq_ratio_mean"] = col["seq_ratio"] / n_nonempty.clamp(min=1)
    else:
        out["num_clipped"] = col["clipped_tokens"]
        out["clip_frac"] = out["token_clip_frac"]
    if config.use_tis:
        out["tis_weight_mean"] = token_mean("tis_weight")
        if config.tis_level == "token":  # per-token sums and a per-token max
            terms, truncated, masked = tokens, col["tis_truncated"], col["tis_masked"]
            ratio_max = table[:, COL["tis_ratio_max"]]
        else:  # per-sequence flags (already × [n_i > 0])
            terms, truncated, masked = n_nonempty, col["seq_tis_truncated"], col["seq_tis_masked"]
            ratio_max = table[:, COL["seq_tis_ratio"]]
        out["tis_num_terms"] = terms
        out["tis_truncated_frac"] = truncated / terms.clamp(min=1)
        out["tis_masked_frac"] = masked / terms.clamp(min=1)
        out["tis_ratio_max"] = ratio_max.max() if ratio_max.numel() else tokens.new_zeros(())
    if has_kl:
        out["kl"] = token_mean("kl")
    if entropy_mean is not None:
        out["entropy"] = entropy_mean
    seq_grad = table[:, COL["grad_abs"]].contiguous()
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(seq_grad, group=cp_group)
    out["length_weight_share"] = length_weight_share(seq_grad, seq_len)
    keys = list(out)
    values = torch.stack([out[k].to(torch.float64) for k in keys]).tolist()
    return dict(zip(keys, values))


def rollout_metrics(
    rewards: torch.Tensor,
    response_lengths: torch.Tensor,
    truncated: torch.Tensor,
    advantages: torch.Tensor,
    correct: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reward, accuracy, response-length and advantage statistics of one rollout batch ([B] each).

    ``correct`` defaults to reward > 0 (a verifiable reward of 1 for a right answer)."""
    lengths = response_lengths.double()
    if correct is None:
        correct = rewards > 0
    return {
        "reward_mean": float(rewards.double().mean()),
        "accuracy": float(correct.double().mean()),
        "response_len_mean": float(lengths.mean()),
        "response_len_p50": float(lengths.median()),
        "response_len_max": float(lengths.max()),
        "truncation_rate": float(truncated.double().mean()),
        "advantage_std": float(advantages.double().std()) if advantages.numel() > 1 else 0.0,
    }


def reduce_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch (or per-rank) ``policy_loss`` metrics into step metrics.

    Sums add; token means are weighted by ``num_tokens``; sequence means by ``num_seqs``; the TIS
    fractions by ``tis_num_terms``; maxima take the max. Any other key is averaged with equal weight."""
    parts = list(parts)
    if not parts:
        return {}
    keys = {k for p in parts for k in p}
    out: dict[str, float] = {}
    for key in sorted(keys):
        present = [p for p in parts if key in p]
        if key in SUMMED:
            out[key] = sum(p[key] for p in present)
            continue
        if key in MAXED:
            out[key] = max(p[key] for p in present)
            continue
        weight_key = ("num_tokens" if key in TOKEN_MEANS else "num_seqs" if key in SEQ_MEANS
                      else "tis_num_terms" if key in TIS_TERM_MEANS else None)
        weights = [p.get(weight_key, 1.0) if weight_key else 1.0 for p in present]
        total = sum(weights)
        out[key] = sum(w * p[key] for w, p in zip(weights, present)) / total if total > 0 else 0.0
    return out
