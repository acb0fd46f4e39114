"""Pack rollouts into micro-batches (THD layout) under a token budget, balanced across DP ranks.

docs/design.md §4 step 4. Input: B sequences (prompt ids, response ids, per-response-token rollout
log-probs) and one advantage each. Output: for every DP rank, a list of :class:`MicroBatch`; each
holds whole sequences (a sequence is never split) concatenated along one token axis:

    tokens        [T]    int64   prompt + response of each sequence, then its padding
    position_ids  [T]    int64   0, 1, … restarting at every sequence (padding continues the count)
    cu_seqlens    [n+1]  int32   boundaries of the (padded) sequences: seq i is cu[i] : cu[i+1]
    loss_mask     [T]    float32 1 on response tokens, 0 on prompt tokens and padding
    rollout_logp  [T]    float32 the engine's log p(token_t | tokens_<t) at response tokens, else 0
    advantages    [n]    float32 Â of each sequence
    sample_index  [n]    int64   index of each sequence in the input (to map results back)
    routed_experts [L, T, k] int64 routing replay (R3) only: the engine's experts per position

Token t's log-prob is stored at t itself: the trainer computes log p(tokens[t]) from the logits at
t − 1 and compares it there. With ``pad_multiple = 2·cp`` every sequence is padded to a multiple of
it (context parallelism splits each sequence into 2·cp chunks); padding has mask 0.

Two steps, both greedy with known guarantees:
1. Balance: sequences, longest first, each to the DP rank with the fewest tokens so far (LPT;
   its largest load is ≤ 4/3 of the optimum).
2. Pack each rank's share with first-fit decreasing under ``max_tokens_per_micro_batch`` (≤ 11/9·OPT
   + 6/9 micro-batches). With ``equal_micro_batches`` (the default, as Megatron's schedule runs the
   same number of micro-batches on every DP rank) ranks with fewer micro-batches split their fullest
   ones until all ranks have as many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from luspo_megatron.errors import ConfigError, DataError


@dataclass
class MicroBatch:
    """One packed micro-batch of whole sequences (THD), TOKEN-ALIGNED: every per-token array is
    indexed by the token it is about (``old_logp[t]`` is log p(tokens[t] | tokens[<t])). [T]
    tensors unless noted. This is the one micro-batch type: the packer emits it, the trainer fills
    ``old_logp`` / ``ref_logp``, and ``parallel/microbatch.py`` cuts it into each rank's
    label-aligned part.

    ``advantages`` is [n] (per sequence) or [T] (per token, grpo / gspo_token). ``routed_experts``
    is [num_moe_layers, T, top_k] (MoE layers in model order, position-aligned: the experts chosen
    when the model read tokens[t]) for routing replay (R3)."""

    tokens: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [n + 1] int32, cu_seqlens[-1] == T
    loss_mask: torch.Tensor | None = None  # [T] 1 on response tokens
    advantages: torch.Tensor | None = None  # [n] or [T]
    old_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None  # the engine's log-probs at response tokens, 0 elsewhere
    ref_logp: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None  # [num_moe_layers, T, top_k] int64
    position_ids: torch.Tensor | None = None  # [T] 0, 1, ... restarting at every sequence
    sample_index: torch.Tensor | None = None  # [n] index of each sequence in the packer's input

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def validate(self, index: int = 0) -> None:
        """One-line :class:`DataError` for inconsistent shapes."""
        where = f"micro-batch {index}"
        total = self.tokens.numel()
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
            raise DataError(f"{where}: cu_seqlens must start at 0 and end at the {total} tokens, got {cu.tolist()}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise DataError(f"{where}: cu_seqlens must be strictly increasing (no empty sequence)")
        for name in ("loss_mask", "old_logp", "rollout_logp", "ref_logp"):
            value = getattr(self, name)
            if value is not None and value.shape != (total,):
                raise DataError(f"{where}: {name} must be [{total}], got {tuple(value.shape)}")
        if self.advantages is not None and self.advantages.numel() not in (self.num_sequences, total):
            raise DataError(f"{where}: advantages must be [{self.num_sequences}] or [{total}], "
                            f"got {tuple(self.advantages.shape)}")
        if self.loss_mask is not None and bool(self.loss_mask[cu[:-1].long()].ne(0).any()):
            raise DataError(f"{where}: loss_mask must be 0 on the first token of every sequence "
                            "(it has no prediction; token-aligned layout)")


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def balance_across_ranks(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """LPT: indices per rank, longest sequences placed first onto the least-loaded rank."""
    loads = [0] * dp_size
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp_size), key=lambda r: (loads[r], len(ranks[r]), r))
        ranks[r].append(i)
        loads[r] += lengths[i]
    return ranks


def first_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to ≤ ``budget`` (every length must be ≤ budget)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def _split_to(bins: list[list[int]], count: int, lengths: Sequence[int]) -> list[list[int]]:
    """Split the fullest multi-sequence bin in two (balanced halves) until there are ``count`` bins."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches from {sum(map(len, bins))} sequences")
        fullest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(fullest)
        halves = balance_across_ranks([lengths[i] for i in fullest], 2)
        bins.extend([[fullest[j] for j in h] for h in halves])
    return bins


def pack_micro_batches(
    sequences: Sequence[Any], advantages: Sequence[float] | torch.Tensor, *, max_tokens_per_micro_batch: int,
    dp_size: int = 1, pad_multiple: int = 1, pad_token_id: int = 0, equal_micro_batches: bool = True,
    micro_batch_multiple: int = 1, routed_experts: bool = False,
) -> list[list[MicroBatch]]:
    """``sequences[i]`` has ``prompt_ids``, ``response_ids`` and ``rollout_logp`` (a rollout
    :class:`~luspo_megatron.rollout.engine.Sample` does), and with ``routed_experts`` (routing
    replay) also ``routed_experts``. Returns ``out[dp_rank][micro_batch]``."""
    if dp_size < 1 or pad_multiple < 1:
        raise ValueError(f"dp_size and pad_multiple must be ≥ 1, got {dp_size} and {pad_multiple}")
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    if advantages.numel() != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {advantages.numel()} advantages")
    if len(sequences) < dp_size:
        raise ValueError(f"{len(sequences)} sequences cannot fill {dp_size} data-parallel ranks")
    lengths = [padded_length(len(s.prompt_ids) + len(s.response_ids), pad_multiple) for s in sequences]
    longest = max(lengths)
    if longest > max_tokens_per_micro_batch:
        raise ConfigError(
            f"--max-tokens-per-micro-batch: expected ≥ the longest sequence ({longest} tokens, padded to a "
            f"multiple of {pad_multiple}), got {max_tokens_per_micro_batch}", field="max_tokens_per_micro_batch",
        )
    per_rank = balance_across_ranks(lengths, dp_size)
    bins = [first_fit_decreasing(idx, lengths, max_tokens_per_micro_batch) for idx in per_rank]
    if equal_micro_batches:
        count = max(len(b) for b in bins)
        # Interleaved pipelining runs micro-batches in rounds of pp: round the count up.
        count = -(-count // micro_batch_multiple) * micro_batch_multiple
        bins = [_split_to(b, count, lengths) for b in bins]
    return [[_build(sequences, advantages, sorted(b), lengths, pad_token_id, routed_experts) for b in rank]
            for rank in bins]


def _build(sequences, advantages: torch.Tensor, indices: list[int], lengths: Sequence[int],
           pad_token_id: int, with_routing: bool) -> MicroBatch:
    tokens, positions, mask, logp, cu = [], [], [], [], [0]
    for i in indices:
        s = sequences[i]
        prompt, response = list(s.prompt_ids), list(s.response_ids)
        if len(s.rollout_logp) != len(response):
            raise ValueError(f"sequence {i}: {len(s.rollout_logp)} rollout log-probs for {len(response)} tokens")
        pad = lengths[i] - len(prompt) - len(response)
        tokens += prompt + response + [pad_token_id] * pad
        positions += list(range(lengths[i]))
        mask += [0.0] * len(prompt) + [1.0] * len(response) + [0.0] * pad
        logp += [0.0] * len(prompt) + [float(x) for x in s.rollout_logp] + [0.0] * pad
        cu.append(cu[-1] + lengths[i])
    index = torch.tensor(indices, dtype=torch.long)
    return MicroBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        loss_mask=torch.tensor(mask, dtype=torch.float32),
        rollout_logp=torch.tensor(logp, dtype=torch.float32),
        advantages=advantages[index],
        sample_index=index,
        routed_experts=_routing(sequences, indices, lengths) if with_routing else None,
    )


def _routing(sequences, indices: list[int], lengths: Sequence[int]) -> torch.Tensor:
    """[num_moe_layers, T, top_k]: each sequence's engine routing, position-aligned (R3). The engine
    routes prompt + response − 1 positions (the last token is never an input): its neighbour's
    routing stands in; padding positions get the distinct experts 0 … top_k − 1."""
    parts = []
    for i in indices:
        r = sequences[i].routed_experts
        if r is None:
            raise DataError(f"sequence {i}: no routed_experts for routing replay (R3): the SGLang server runs "
                            "without --enable-return-routed-experts, or an sglang-router dropped "
                            "return_routed_experts (give the servers with --sglang-url)")
        r = torch.as_tensor(r).long()  # [prompt + response − 1, layers, top_k]
        r = torch.cat([r, r[-1:]])  # the last token's stand-in
        pad = lengths[i] - r.shape[0]
        if pad:
            r = torch.cat([r, torch.arange(r.shape[-1]).expand(pad, r.shape[1], r.shape[-1])])
        parts.append(r.permute(1, 0, 2))
    return torch.cat(parts, dim=1)
