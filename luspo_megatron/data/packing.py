"""Pack rollouts into micro-batches (THD layout) under a token budget, balanced across DP ranks.

DESIGN.md §4 step 4. Input: B sequences (prompt ids, response ids, per-response-token rollout
log-probs) and one advantage each. Output: for every DP rank, a list of :class:`MicroBatch`; each
holds whole sequences (a sequence is never split) concatenated along one token axis:

    tokens        [T]    int64   prompt + response of each sequence, then its padding
    position_ids  [T]    int64   0, 1, … restarting at every sequence (padding continues the count)
    cu_seqlens    [n+1]  int32   boundaries of the (padded) sequences: seq i is cu[i] : cu[i+1]
    loss_mask     [T]    float32 1 on response tokens, 0 on prompt tokens and padding
    rollout_logp  [T]    float32 the engine's log p(token_t | tokens_<t) at response tokens, else 0
    advantages    [n]    float32 Â of each sequence
    sample_index  [n]    int64   index of each sequence in the input (to map results back)

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

from luspo_megatron.errors import ConfigError


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    sample_index: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.sample_index.numel()

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


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
) -> list[list[MicroBatch]]:
    """``sequences[i]`` has ``prompt_ids``, ``response_ids`` and ``rollout_logp`` (a rollout
    :class:`~luspo_megatron.rollout.engine.Sample` does). Returns ``out[dp_rank][micro_batch]``."""
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
        bins = [_split_to(b, count, lengths) for b in bins]
    return [[_build(sequences, advantages, sorted(b), lengths, pad_token_id) for b in rank] for rank in bins]


def _build(sequences, advantages: torch.Tensor, indices: list[int], lengths: Sequence[int],
           pad_token_id: int) -> MicroBatch:
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
    )
