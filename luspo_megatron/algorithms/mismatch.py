"""Train–inference mismatch metrics: how far the rollout engine's log-probs are from the trainer's π_old.

On response tokens (m_t = 1), with Δ_t = old_logp_t − rollout_logp_t = log(π_old / π_rollout):

    mismatch_k3_kl          (1/N) Σ_t m_t (e^{Δ_t} − 1 − Δ_t)      k3 estimate of KL(π_rollout ‖ π_old)
    mismatch_kl             (1/N) Σ_t m_t (−Δ_t)                   k1 estimate of the same KL
    mismatch_abs_logp_diff  (1/N) Σ_t m_t |Δ_t|                    mean |Δlogp|
    mismatch_seq_ratio_max  max_i exp(Σ_t m_t Δ_t)                 largest sequence importance weight Π_t ρ_t
    mismatch_geo_ratio_max  max_i exp((1/|y_i|) Σ_t m_t Δ_t)       its geometric (length-normalised) form

N = Σ_t m_t over the whole step. Direction: the tokens are sampled by the rollout engine, so the k3 estimator
E_{y∼π_rollout}[ρ − 1 − log ρ] with ρ = π_old/π_rollout estimates KL(π_rollout ‖ π_old) (E_rollout[ρ] = 1). This is
verl's ``rollout_corr/k3_kl`` and slime's ``mismatch_k3_kl`` (both: log_ratio = train − rollout,
exp(log_ratio) − log_ratio − 1); ``mismatch_kl`` is their ``kl`` (rollout − train); ``mismatch_abs_logp_diff``
is TRL's ``sampling/sampling_logp_difference/mean`` and slime's ``train_rollout_logprob_abs_diff``, here as a
global token mean. All are exactly 0 when the two log-probs agree. k3 uses expm1 (no cancellation near 0).

To combine micro-batches and data-parallel ranks, ``mismatch_stats`` returns sums and maxima: add the sums,
take the max of the maxima (``merge_mismatch`` locally, ``all_reduce_mismatch`` over a process group), then
``finalize_mismatch``. The maxima are kept as log-ratios (no overflow) and reported as exp(min(·, 80)).
Inside a loss function whose metrics travel as float dicts (``metrics.reduce_metrics``), ``mismatch_partials``
gives the same statistics as keys that reduce_metrics sums or maxes, and ``finalize_mismatch_partials`` the
metrics from the reduced dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from luspo_megatron.algorithms.tis import LOG_RATIO_MAX
from luspo_megatron.ops.segments import segment_ids

# Partial statistics as float metrics: summed / maxed by metrics.reduce_metrics (metrics.SUMMED / MAXED).
PARTIAL_SUM_KEYS = ("mismatch_part_tokens", "mismatch_part_k3", "mismatch_part_k1", "mismatch_part_abs")
PARTIAL_MAX_KEYS = ("mismatch_part_seq_log_max", "mismatch_part_geo_log_max")
MISMATCH_KEYS = ("mismatch_k3_kl", "mismatch_kl", "mismatch_abs_logp_diff", "mismatch_seq_ratio_max",
                 "mismatch_geo_ratio_max", "mismatch_seq_log_ratio_max", "mismatch_num_tokens")


class MismatchStats(NamedTuple):
    """Reducible partial statistics, float64."""

    sums: torch.Tensor
    """[4]: N = Σ m, Σ m·k3, Σ m·(−Δ), Σ m·|Δ|. Reduce by SUM."""
    maxima: torch.Tensor
    """[2]: max_i Σ_t m_t Δ_t and max_i (1/|y_i|) Σ_t m_t Δ_t over non-empty sequences (−inf: none). Reduce by MAX."""


def mismatch_stats(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> MismatchStats:
    """Partial statistics of one packed micro-batch: ``old_logp``/``rollout_logp``/``loss_mask`` [T],
    ``cu_seqlens`` [B+1] (tokens past cu_seqlens[-1] are padding). ``cp_group``: the context-parallel group
    when this rank holds only chunks of every sequence (the per-sequence sums are all-reduced over it; the token
    sums stay local, so reduce them over every DP×CP rank afterwards)."""
    assert old_logp.shape == rollout_logp.shape == loss_mask.shape and old_logp.dim() == 1, (
        f"old_logp, rollout_logp, loss_mask: expected equal [T] shapes, got {tuple(old_logp.shape)}, "
        f"{tuple(rollout_logp.shape)}, {tuple(loss_mask.shape)}")
    num_seqs, total = cu_seqlens.numel() - 1, old_logp.numel()
    seg = segment_ids(cu_seqlens, total)  # [T], B for padding
    mask = loss_mask.to(torch.float64) * (seg < num_seqs)
    on = mask > 0
    # Δ_t on response tokens; garbage elsewhere (prompt, padding) is selected away, never multiplied by 0.
    delta = torch.where(on, old_logp.to(torch.float64) - rollout_logp.to(torch.float64), torch.zeros_like(mask))
    k3 = torch.expm1(delta) - delta  # e^Δ − 1 − Δ ≥ 0, exactly 0 at Δ = 0
    sums = torch.stack([mask.sum(), (mask * k3).sum(), (mask * -delta).sum(), (mask * delta.abs()).sum()])
    per_seq = torch.zeros(num_seqs + 1, 2, dtype=torch.float64, device=mask.device)
    per_seq.index_add_(0, seg, torch.stack([mask * delta, mask], dim=1))  # [B+1, 2]: Σ m Δ, |y_i|
    per_seq = per_seq[:num_seqs]
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(per_seq, group=cp_group)
    log_seq, length = per_seq[:, 0], per_seq[:, 1]
    nonempty = length > 0
    neg_inf = torch.full_like(log_seq, -math.inf)
    maxima = torch.stack([
        torch.where(nonempty, log_seq, neg_inf).max() if num_seqs else mask.new_tensor(-math.inf),
        torch.where(nonempty, log_seq / length.clamp(min=1), neg_inf).max() if num_seqs else mask.new_tensor(-math.inf),
    ])
    return MismatchStats(sums, maxima)


def merge_mismatch(parts: Iterable[MismatchStats]) -> MismatchStats:
    """The statistics of several micro-batches together (sums add, maxima take the max)."""
    parts = list(parts)
    assert parts, "merge_mismatch: expected at least one MismatchStats"
    return MismatchStats(torch.stack([p.sums for p in parts]).sum(dim=0),
                         torch.stack([p.maxima for p in parts]).max(dim=0).values)


def all_reduce_mismatch(stats: MismatchStats, group: "torch.distributed.ProcessGroup | None" = None) -> MismatchStats:
    """``stats`` combined over every rank of ``group`` (the DP×CP group of the step): two all-reduces."""
    sums, maxima = stats.sums.clone(), stats.maxima.clone()
    torch.distributed.all_reduce(sums, group=group)
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    return MismatchStats(sums, maxima)


def finalize_mismatch(stats: MismatchStats) -> dict[str, float]:
    """The metrics of the module docstring from (fully reduced) statistics. No token: every value 0."""
    n, k3, k1, abs_diff = stats.sums.tolist()
    seq_max, geo_max = stats.maxima.tolist()

    def ratio(log_max: float) -> float:
        return math.exp(min(log_max, LOG_RATIO_MAX)) if log_max > -math.inf else 0.0

    denom = max(n, 1.0)
    return {
        "mismatch_k3_kl": k3 / denom,
        "mismatch_kl": k1 / denom,
        "mismatch_abs_logp_diff": abs_diff / denom,
        "mismatch_seq_ratio_max": ratio(seq_max),
        "mismatch_geo_ratio_max": ratio(geo_max),
        "mismatch_seq_log_ratio_max": seq_max if seq_max > -math.inf else 0.0,
        "mismatch_num_tokens": n,
    }


def mismatch_partials(stats: MismatchStats) -> dict[str, float]:
    """``stats`` as float metrics that ``metrics.reduce_metrics`` combines exactly (sums add, maxima max)."""
    return dict(zip(PARTIAL_SUM_KEYS + PARTIAL_MAX_KEYS, stats.sums.tolist() + stats.maxima.tolist()))


def finalize_mismatch_partials(metrics: dict[str, float]) -> dict[str, float]:
    """``finalize_mismatch`` of the partial keys in ``metrics`` (after reduce_metrics over micro-batches and ranks)."""
    return finalize_mismatch(MismatchStats(torch.tensor([metrics[k] for k in PARTIAL_SUM_KEYS], dtype=torch.float64),
                                           torch.tensor([metrics[k] for k in PARTIAL_MAX_KEYS], dtype=torch.float64)))
