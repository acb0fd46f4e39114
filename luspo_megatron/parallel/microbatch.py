"""The layout of a packed micro-batch on one TP/CP rank.

The trainer's view is the one micro-batch type, :class:`luspo_megatron.data.packing.MicroBatch`:
TOKEN-ALIGNED, every per-token array indexed by the token it is about. ``old_logp[t]`` is
log p(tokens[t] | tokens[<t]); ``loss_mask[t]`` is 1 when tokens[t] is a response token to train
on (so the first token of every sequence, a prompt token, is never masked in). The rollout
engine's log-probs of generated tokens drop straight in.

The model works LABEL-ALIGNED: position t predicts tokens[t+1]. :func:`shard_micro_batch`
shifts every token-aligned array by one inside each sequence (the label of the last token of a
sequence is a dummy with mask 0), pads, and cuts the result into this rank's part:

- every sequence is padded at its end to a multiple of 2·cp (context parallel only), then one
  padding sequence is appended so that each CP rank's token count divides by tp (sequence
  parallel scatters it); padding has mask 0 and attends only within its own sequence;
- with cp > 1, Megatron's zigzag layout: each padded sequence is cut into 2·cp equal chunks and
  rank r keeps chunks r and 2·cp−1−r (balanced causal-attention work);
- MoE routing to replay (R3) is POSITION-aligned (the experts chosen when the model read
  tokens[t]); it follows the tokens and, with sequence parallelism, the router's TP slice.

:func:`unshard_logprobs` inverts the layout for per-token outputs (all-gather over CP, unzigzag,
shift back to token alignment, drop padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from luspo_megatron.data.packing import MicroBatch


@dataclass
class LocalMicroBatch:
    """This rank's label-aligned part of a micro-batch, ready for the model and the loss."""

    input_ids: torch.Tensor  # [1, t]
    labels: torch.Tensor  # [t]
    packed_seq_params: PackedSeqParams
    cu_seqlens: torch.Tensor  # [B + 1] local boundaries of the real sequences (loss; padding trails)
    index: torch.Tensor  # [t] positions of this rank's tokens in the padded global layout
    padded_offsets: torch.Tensor  # [B] start of each real sequence in the padded global layout
    padded_total: int
    loss_mask: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None  # [num_moe_layers, t_router, topk] (SP slice)
    lengths: torch.Tensor | None = None  # [B] real sequence lengths


def zigzag_index(padded_lengths: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (in the padded global layout) of the tokens CP rank ``cp_rank`` holds."""
    parts, offset = [], 0
    for length in padded_lengths:
        if cp_size == 1:
            parts.append(torch.arange(offset, offset + length))
        else:
            chunk = length // (2 * cp_size)
            for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
                parts.append(torch.arange(offset + c * chunk, offset + (c + 1) * chunk))
        offset += length
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _next_token_aligned(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                        offsets: torch.Tensor, total: int, fill=0) -> torch.Tensor:
    """Scatter a token-aligned [T] array into the padded label-aligned layout:
    out[offset_i + j] = values[start_i + j + 1] for j < len_i − 1, ``fill`` elsewhere."""
    out = torch.full((total,), fill, dtype=values.dtype)
    for start, length, offset in zip(starts.tolist(), lengths.tolist(), offsets.tolist()):
        out[offset: offset + length - 1] = values[start + 1: start + length]
    return out


def _position_aligned(values: torch.Tensor, starts, lengths, offsets, total: int, dim: int = 0,
                      fill: torch.Tensor | None = None) -> torch.Tensor:
    shape = list(values.shape)
    shape[dim] = total
    out = fill.expand(*shape).clone() if fill is not None else values.new_zeros(shape)
    for start, length, offset in zip(starts.tolist(), lengths.tolist(), offsets.tolist()):
        out.narrow(dim, offset, length).copy_(values.narrow(dim, start, length))
    return out


def shard_micro_batch(mb: MicroBatch, *, cp_size: int, cp_rank: int, tp_size: int, tp_rank: int = 0,
                      sequence_parallel: bool = False, cp_group=None, device=None) -> LocalMicroBatch:
    """Label-align, pad and cut ``mb`` for one (cp_rank, tp_rank). See the module docstring."""
    cu = mb.cu_seqlens.detach().to("cpu", torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    unit = 2 * cp_size if cp_size > 1 else 1
    padded = ((lengths + unit - 1) // unit) * unit
    total_real = int(padded.sum())
    extra = (-total_real) % (unit * tp_size)  # per-CP-rank count divisible by tp
    padded_lengths = padded.tolist() + ([extra] if extra else [])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)[:-1]])
    total = total_real + extra
    index = zigzag_index(padded_lengths, cp_size, cp_rank)

    tokens = mb.tokens.detach().cpu().long()
    ids = _position_aligned(tokens, starts, lengths, offsets, total)
    labels = _next_token_aligned(tokens, starts, lengths, offsets, total)

    def label_aligned(value):
        if value is None:
            return None
        return _next_token_aligned(value.detach().cpu(), starts, lengths, offsets, total)[index]

    advantages = mb.advantages
    if advantages is not None and advantages.numel() == tokens.numel() and advantages.numel() != mb.num_sequences:
        advantages = label_aligned(advantages)
    cu_padded = torch.tensor([0, *torch.tensor(padded_lengths).cumsum(0).tolist()], dtype=torch.int32)
    real_lengths = torch.tensor(lengths.tolist() + ([0] if extra else []))
    cu_real = torch.cat([torch.zeros(1, dtype=torch.int32), real_lengths.cumsum(0).to(torch.int32)])
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real, cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(padded_lengths), max_seqlen_kv=max(padded_lengths),
        cp_group=cp_group,
    )
    routed = None
    if mb.routed_experts is not None:
        experts = mb.routed_experts.detach().cpu().long()
        topk = experts.shape[-1]
        pad = torch.arange(topk).expand(experts.shape[0], 1, topk)  # distinct ids for padding tokens
        routed = _position_aligned(experts, starts, lengths, offsets, total, dim=1, fill=pad)[:, index]
        if sequence_parallel and tp_size > 1:
            routed = routed.chunk(tp_size, dim=1)[tp_rank]
    local_cu = torch.cat([torch.zeros(1, dtype=torch.long), (padded // cp_size).cumsum(0)])

    def dev(x):
        return None if x is None else x.to(device) if device is not None else x

    return LocalMicroBatch(
        input_ids=dev(ids[index][None]),
        labels=dev(labels[index]),
        packed_seq_params=PackedSeqParams(**{k: dev(v) if torch.is_tensor(v) else v for k, v in vars(packed).items()}),
        cu_seqlens=dev(local_cu),
        index=index,
        padded_offsets=offsets,
        padded_total=total,
        loss_mask=dev(label_aligned(mb.loss_mask)),
        advantages=dev(advantages.detach().cpu() if advantages is not None and advantages.dim() else advantages),
        old_logp=dev(label_aligned(mb.old_logp)),
        rollout_logp=dev(label_aligned(mb.rollout_logp)),
        ref_logp=dev(label_aligned(mb.ref_logp)),
        routed_experts=dev(routed),
        lengths=lengths,
    )


def unshard_logprobs(local: torch.Tensor, lmb: LocalMicroBatch, cp_group=None) -> torch.Tensor:
    """This rank's label-aligned [t] values -> the micro-batch's token-aligned [T] values
    (all-gathered over CP; 0 at the first token of every sequence)."""
    local = local.detach()
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    padded = torch.zeros(lmb.padded_total, dtype=local.dtype, device=local.device)
    if cp_size > 1:
        pieces = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(pieces, local.contiguous(), group=cp_group)
        padded_lengths = (lmb.packed_seq_params.cu_seqlens_q_padded[1:]
                          - lmb.packed_seq_params.cu_seqlens_q_padded[:-1]).tolist()
        for rank, piece in enumerate(pieces):
            padded[zigzag_index(padded_lengths, cp_size, rank).to(local.device)] = piece
    else:
        padded[lmb.index.to(local.device)] = local
    out = []
    for offset, length in zip(lmb.padded_offsets.tolist(), lmb.lengths.tolist()):
        out.append(torch.cat([padded.new_zeros(1), padded[offset: offset + length - 1]]))
    return torch.cat(out)
