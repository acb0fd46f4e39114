"""Per-sequence reduction of the log-ratio on packed (THD) tensors: the pure-PyTorch reference, and
``seq_logratio``, which runs phase 1 of the csrc extension instead when it is built for the device.

For sequence i of a packed micro-batch (tokens ``cu_seqlens[i] : cu_seqlens[i+1]``) this computes

    S_i = Σ_t m_t · (logp_t − old_logp_t)          (differentiable w.r.t. logp)
    n_i = Σ_t m_t                                   (= |y_i|, the response length)
    R_i = Σ_t m_t · (old_logp_t − rollout_logp_t)   (only when rollout log-probs are given; TIS)

which is everything GSPO/LUSPO need from the tokens: s_i = exp(S_i / n_i) (docs/design.md §2).

Context parallel: with CP > 1 each rank holds only its chunks of every sequence, so the sums above
are partial. One ``all_reduce(SUM)`` of the stacked [B, k] partial sums over the CP group makes them
global; its backward is again an all-reduce of the gradient, because every CP rank's loss depends on
every other rank's tokens through S_i. That moves B·k numbers, never the token-level log-probs.

Pipeline parallel needs nothing here: the op runs on the last stage only, on whole sequences
(a sequence is never split across micro-batches), so no partial sums live on other stages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from luspo_megatron.ops._extension import fused_available
from luspo_megatron.ops.segments import segment_ids


class SeqSums(NamedTuple):
    """Per-sequence sums; every field is [B] and global over the CP group when one was given."""

    sum_delta: torch.Tensor
    num_tokens: torch.Tensor
    sum_rollout_log_ratio: torch.Tensor | None


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    # index_add into B+1 slots (the extra one swallows trailing padding); differentiable in values.
    out = values.new_zeros(num_segments + 1).index_add(0, seg, values)
    return out[:num_segments]


def seq_logratio_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rollout_logp: torch.Tensor | None = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> SeqSums:
    """Eager reference of the per-sequence sums (see the module docstring). Inputs are [T]."""
    num_seqs = cu_seqlens.numel() - 1
    mask = loss_mask.to(logp.dtype)
    seg = segment_ids(cu_seqlens, logp.numel())
    columns = [
        _segment_sum(mask * (logp - old_logp), seg, num_seqs),
        _segment_sum(mask, seg, num_seqs),
    ]
    if rollout_logp is not None:
        columns.append(_segment_sum(mask * (old_logp - rollout_logp).to(logp.dtype), seg, num_seqs))
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        from torch.distributed.nn.functional import all_reduce

        stacked = all_reduce(torch.stack(columns, dim=1), group=cp_group)  # [B, k], autograd-aware
        columns = list(stacked.unbind(dim=1))
    return SeqSums(columns[0], columns[1].detach(), columns[2].detach() if len(columns) > 2 else None)


def seq_logratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rollout_logp: torch.Tensor | None = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> SeqSums:
    """The per-sequence sums of the module docstring, from the csrc extension's phase 1 when it is built
    for ``logp``'s device (sums in float32 for float32/bf16/fp16 inputs, float64 for float64), else from
    ``seq_logratio_reference``. Same autograd and CP semantics either way."""
    if not fused_available(logp.device):
        return seq_logratio_reference(logp, old_logp, loss_mask, cu_seqlens, rollout_logp, cp_group)
    from luspo_megatron.ops.fused_policy_loss import seq_sums

    columns = seq_sums(logp, old_logp, loss_mask, cu_seqlens, rollout_logp, cp_group).unbind(dim=1)
    return SeqSums(columns[0], columns[1].detach(), columns[2].detach() if len(columns) > 2 else None)
