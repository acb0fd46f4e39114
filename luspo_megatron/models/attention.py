"""Core attention for the local (no Transformer Engine) spec, with packed THD sequences and CP.

Why this exists: megatron.core's local ``DotProductAttention`` rejects ``packed_seq_params`` and
asserts ``context_parallel_size == 1`` (both "only supported by TEDotProductAttention"). RL batches
are packed (THD), and CPU tests must exercise CP, so the local spec gets this module instead. With
Transformer Engine (GPU) the TE spec's ``TEDotProductAttention`` is used and this is never built.

Math, per packed token q of sequence i at position p (within its padded sequence):

    out_q = Σ_k softmax_k( q·k / √d  over keys k of sequence i with position ≤ p ) · v_k

GQA repeats each key/value head for its query heads. Context parallel (Megatron's zigzag layout:
each sequence of padded length L is cut into 2·cp chunks of L/(2·cp); rank r holds chunks r and
2·cp−1−r): the keys and values of every CP rank are all-gathered (Megatron's own
``gather_from_sequence_parallel_region`` over the CP group: all-gather forward, reduce-scatter
backward), and the causal mask uses each token's global position. This is the "all-gather" CP
variant; it is exact, and cheap enough for the tiny CPU models it serves.
"""

from __future__ import annotations

import math

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def zigzag_positions(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position in the sequence) of every token a CP rank holds, in its local order.

    ``cu_seqlens_padded`` are the GLOBAL boundaries (every length a multiple of 2·cp)."""
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).tolist()
    seq_ids, positions = [], []
    for seq, length in enumerate(lengths):
        chunk = length // (2 * cp_size)
        if cp_size == 1:
            pos = torch.arange(length)
        else:
            pos = torch.cat([
                torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk),
            ])
        positions.append(pos)
        seq_ids.append(torch.full_like(pos, seq))
    return torch.cat(seq_ids), torch.cat(positions)


class PackedDotProductAttention(MegatronModule):
    """Drop-in ``core_attention`` of the local spec (same constructor and forward signature as
    megatron.core's ``DotProductAttention``) that understands THD packing and context parallel."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.attention_dropout and (attention_dropout is None or attention_dropout > 0):
            raise ValueError("PackedDotProductAttention: attention dropout is not supported")
        self.layer_number = layer_number
        self.pg_collection = pg_collection
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _cp_group(self, packed_seq_params: PackedSeqParams | None):
        if packed_seq_params is not None and packed_seq_params.cp_group is not None:
            return packed_seq_params.cp_group
        return getattr(self.pg_collection, "cp", None)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedDotProductAttention: attention_bias is not supported")
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return self._forward_sbhd(query, key, value)
        return self._forward_thd(query, key, value, packed_seq_params)

    def _attend(self, q, k, v, allowed):
        """q [h, t, d], k/v [g, T, d] (g divides h), allowed [t, T] -> [t, h·d]."""
        heads, groups = q.shape[0], k.shape[0]
        if heads != groups:
            k = k.repeat_interleave(heads // groups, dim=0)
            v = v.repeat_interleave(heads // groups, dim=0)
        scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # [h, t, d]
        return out.transpose(0, 1).reshape(out.shape[1], -1)

    def _forward_thd(self, query, key, value, params: PackedSeqParams):
        # query [t, h, d], key/value [t, g, d] (Megatron squeezes the batch dim for THD).
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu = cu.detach().to("cpu", torch.long)
        group = self._cp_group(params)
        cp_size = group.size() if group is not None else 1
        cp_rank = group.rank() if group is not None else 0
        seq_q, pos_q = zigzag_positions(cu, cp_size, cp_rank)
        if cp_size == 1:
            return self._attend_padded(query, key, value, cu, seq_q, pos_q)
        if cp_size > 1:
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
            parts = [zigzag_positions(cu, cp_size, r) for r in range(cp_size)]
            seq_k = torch.cat([p[0] for p in parts])
            pos_k = torch.cat([p[1] for p in parts])
        else:
            seq_k, pos_k = seq_q, pos_q
        if seq_q.numel() != query.shape[0]:
            raise ValueError(f"THD attention: cu_seqlens cover {seq_q.numel()} tokens per rank, "
                             f"the packed tensor has {query.shape[0]}")
        allowed = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
        allowed = allowed.to(query.device)
        return self._attend(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), allowed)

    def _attend_padded(self, query, key, value, cu, seq, pos):
        """Without CP: scatter the packed sequences into a padded [B, L] batch and run causal SDPA
        per sequence. Work is Σ_i L_max² instead of the (Σ_i L_i)² of one mask over the whole pack,
        which matters when a micro-batch packs hundreds of short RL responses."""
        lengths = cu[1:] - cu[:-1]
        num_seqs, max_len = lengths.numel(), int(lengths.max())
        seq, pos = seq.to(query.device), pos.to(query.device)

        def padded(x):  # [t, heads, d] -> [B, heads, L, d]
            out = x.new_zeros(num_seqs, max_len, *x.shape[1:])
            out = out.index_put((seq, pos), x)
            return out.transpose(1, 2)

        q, k, v = padded(query.float()), padded(key.float()), padded(value.float())
        valid = torch.arange(max_len, device=query.device)[None, :] < lengths.to(query.device)[:, None]
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=query.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # [B, h, L, d]
        out = out.transpose(1, 2)[seq, pos]  # [t, h, d]
        return out.reshape(out.shape[0], -1).to(value.dtype)

    def _forward_sbhd(self, query, key, value):
        # query [s, b, h, d] -> out [s, b, h·d]; plain causal attention per batch row.
        group = self._cp_group(None)
        if group is not None and group.size() > 1:
            raise ValueError("PackedDotProductAttention: context parallel needs packed (THD) inputs")
        s = query.shape[0]
        allowed = torch.ones(s, key.shape[0], dtype=torch.bool, device=query.device).tril()
        outs = [
            self._attend(query[:, b].transpose(0, 1), key[:, b].transpose(0, 1), value[:, b].transpose(0, 1), allowed)
            for b in range(query.shape[1])
        ]
        return torch.stack(outs, dim=1)
