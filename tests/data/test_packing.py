"""Packing invariants, checked against per-sequence reconstruction and brute-force optima."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

from luspo_megatron.data.packing import (
    balance_across_ranks,
    first_fit_decreasing,
    pack_micro_batches,
    padded_length,
)
from luspo_megatron.errors import ConfigError


@dataclass
class Seq:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]


def random_sequences(rng: random.Random, n: int) -> list[Seq]:
    out = []
    for _ in range(n):
        p, r = rng.randint(1, 20), rng.randint(1, 40)
        out.append(Seq([rng.randint(2, 99) for _ in range(p)], [rng.randint(2, 99) for _ in range(r)],
                       [-rng.random() for _ in range(r)]))
    return out


@pytest.mark.parametrize("dp_size,pad_multiple,seed", [(1, 1, 0), (2, 1, 1), (3, 4, 2), (4, 2, 3)])
def test_every_sequence_is_packed_once_whole_and_exactly(dp_size, pad_multiple, seed):
    rng = random.Random(seed)
    seqs = random_sequences(rng, 37)
    advantages = [rng.uniform(-2, 2) for _ in seqs]
    budget = 128
    packed = pack_micro_batches(seqs, advantages, max_tokens_per_micro_batch=budget, dp_size=dp_size,
                                pad_multiple=pad_multiple, pad_token_id=0)
    assert len(packed) == dp_size
    assert len({len(rank) for rank in packed}) == 1  # same number of micro-batches on every DP rank
    seen = []
    for rank in packed:
        for mb in rank:
            assert mb.num_tokens <= budget and mb.cu_seqlens.dtype == torch.int32
            assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.num_tokens
            for j, i in enumerate(mb.sample_index.tolist()):
                seen.append(i)
                s = seqs[i]
                lo, hi = mb.cu_seqlens[j].item(), mb.cu_seqlens[j + 1].item()
                n_p, n_r = len(s.prompt_ids), len(s.response_ids)
                assert hi - lo == padded_length(n_p + n_r, pad_multiple) and (hi - lo) % pad_multiple == 0
                assert mb.tokens[lo:lo + n_p + n_r].tolist() == s.prompt_ids + s.response_ids
                assert mb.tokens[lo + n_p + n_r:hi].eq(0).all()
                assert mb.position_ids[lo:hi].tolist() == list(range(hi - lo))
                assert mb.loss_mask[lo:hi].tolist() == [0.0] * n_p + [1.0] * n_r + [0.0] * (hi - lo - n_p - n_r)
                assert torch.allclose(mb.rollout_logp[lo + n_p:lo + n_p + n_r], torch.tensor(s.rollout_logp))
                assert mb.rollout_logp[lo:lo + n_p].eq(0).all() and mb.rollout_logp[lo + n_p + n_r:hi].eq(0).all()
                assert mb.advantages[j].item() == pytest.approx(advantages[i])
    assert sorted(seen) == list(range(len(seqs)))  # every sequence exactly once


def brute_force_min_max_load(lengths, dp):
    best = float("inf")
    for assignment in itertools.product(range(dp), repeat=len(lengths)):
        loads = [0] * dp
        for length, r in zip(lengths, assignment):
            loads[r] += length
        best = min(best, max(loads))
    return best


def brute_force_min_bins(lengths, budget):
    n = len(lengths)
    for k in range(1, n + 1):
        for assignment in itertools.product(range(k), repeat=n):
            loads = [0] * k
            for length, b in zip(lengths, assignment):
                loads[b] += length
            if max(loads) <= budget:
                return k
    return n


@pytest.mark.parametrize("seed", range(6))
def test_dp_balance_and_bin_count_are_within_the_greedy_bounds_of_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(8)]
    for dp in (2, 3):
        loads = [sum(lengths[i] for i in rank) for rank in balance_across_ranks(lengths, dp)]
        assert sorted(i for rank in balance_across_ranks(lengths, dp) for i in rank) == list(range(8))
        assert max(loads) <= (4 / 3 - 1 / (3 * dp)) * brute_force_min_max_load(lengths, dp) + 1e-9  # LPT bound
    budget = 60
    bins = first_fit_decreasing(range(8), lengths, budget)
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert len(bins) <= 11 / 9 * brute_force_min_bins(lengths, budget) + 6 / 9  # FFD bound


def test_a_sequence_longer_than_the_budget_is_a_config_error():
    seqs = [Seq([1] * 10, [2] * 30, [0.0] * 30)]
    with pytest.raises(ConfigError, match=r"--max-tokens-per-micro-batch: expected ≥ the longest sequence \(40"):
        pack_micro_batches(seqs, [0.0], max_tokens_per_micro_batch=39)
    with pytest.raises(ConfigError, match=r"\(44 tokens, padded to a multiple of 4\)"):
        pack_micro_batches([Seq([1] * 11, [2] * 30, [0.0] * 30)], [0.0], max_tokens_per_micro_batch=43,
                           pad_multiple=4)
