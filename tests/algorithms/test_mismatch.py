"""Train–inference mismatch metrics (algorithms/mismatch.py) against a direct float64 computation; exactly 0
on identical log-probs; micro-batch and data-parallel splits (real gloo processes) and context-parallel
chunks give the single-call values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from luspo_megatron.algorithms.metrics import reduce_metrics
from luspo_megatron.algorithms.mismatch import (
    MISMATCH_KEYS,
    all_reduce_mismatch,
    finalize_mismatch,
    finalize_mismatch_partials,
    merge_mismatch,
    mismatch_partials,
    mismatch_stats,
)
from tests.algorithms.packed import random_packed_batch


def _batch(seed: int = 0, num_seqs: int = 9):
    gen = torch.Generator().manual_seed(seed)
    batch = random_packed_batch(gen, num_seqs=num_seqs, trailing_pad=4)
    old, rollout = batch.old_logp.clone(), batch.rollout_logp.clone()
    # Garbage on tokens that are not response tokens must not leak into any metric.
    off = batch.loss_mask == 0
    old[off] = float("nan")
    rollout[off] = float("inf")
    return batch, old, rollout


def _direct(batch, old, rollout) -> dict[str, float]:
    """The metrics written out one token at a time in Python floats (float64)."""
    cu = batch.cu_seqlens.tolist()
    n = k3 = k1 = absd = 0.0
    seq_logs, geo_logs = [], []
    for a, b in zip(cu, cu[1:]):
        deltas = [float(old[t]) - float(rollout[t]) for t in range(a, b) if batch.loss_mask[t] != 0]
        for d in deltas:
            n += 1
            k3 += math.exp(d) - 1 - d
            k1 += -d
            absd += abs(d)
        if deltas:
            seq_logs.append(sum(deltas))
            geo_logs.append(sum(deltas) / len(deltas))
    return {"mismatch_k3_kl": k3 / n, "mismatch_kl": k1 / n, "mismatch_abs_logp_diff": absd / n,
            "mismatch_seq_ratio_max": math.exp(max(seq_logs)), "mismatch_geo_ratio_max": math.exp(max(geo_logs)),
            "mismatch_seq_log_ratio_max": max(seq_logs), "mismatch_num_tokens": n}


def test_mismatch_metrics_equal_a_direct_float64_computation():
    batch, old, rollout = _batch()
    got = finalize_mismatch(mismatch_stats(old, rollout, batch.loss_mask, batch.cu_seqlens))
    expected = _direct(batch, old, rollout)
    assert set(got) == set(MISMATCH_KEYS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert got["mismatch_k3_kl"] > 0 and got["mismatch_abs_logp_diff"] > 0


def test_mismatch_metrics_are_exactly_zero_when_the_log_probs_agree():
    batch, old, _ = _batch(seed=1)
    got = finalize_mismatch(mismatch_stats(old, old.clone(), batch.loss_mask, batch.cu_seqlens))
    assert got["mismatch_k3_kl"] == 0.0 and got["mismatch_kl"] == 0.0 and got["mismatch_abs_logp_diff"] == 0.0
    assert got["mismatch_seq_ratio_max"] == 1.0 and got["mismatch_geo_ratio_max"] == 1.0
    # Any difference on one response token makes every divergence positive.
    one = old.clone()
    t = int(torch.nonzero(batch.loss_mask)[0])
    one[t] -= 1e-3
    got = finalize_mismatch(mismatch_stats(old, one, batch.loss_mask, batch.cu_seqlens))
    assert got["mismatch_k3_kl"] > 0 and got["mismatch_abs_logp_diff"] == pytest.approx(1e-3 / batch.loss_mask.sum())
    assert got["mismatch_seq_ratio_max"] == pytest.approx(math.exp(1e-3), rel=1e-12)


def test_micro_batch_split_merges_to_the_single_call():
    batch, old, rollout = _batch(seed=2, num_seqs=10)
    full = finalize_mismatch(mismatch_stats(old, rollout, batch.loss_mask, batch.cu_seqlens))
    parts = []
    for lo, hi in itertools.pairwise([0, 3, 4, 10]):
        t0, t1 = int(batch.cu_seqlens[lo]), int(batch.cu_seqlens[hi])
        parts.append(mismatch_stats(old[t0:t1], rollout[t0:t1], batch.loss_mask[t0:t1],
                                    batch.cu_seqlens[lo:hi + 1] - t0))
    merged = finalize_mismatch(merge_mismatch(parts))
    # The same partials as float metrics, combined by reduce_metrics (how a loss function's metrics travel).
    reduced = finalize_mismatch_partials(reduce_metrics([{**mismatch_partials(p), "num_tokens": 1.0} for p in parts]))
    for key in MISMATCH_KEYS:
        assert merged[key] == pytest.approx(full[key], rel=1e-12, abs=1e-15), key
        assert reduced[key] == pytest.approx(full[key], rel=1e-12, abs=1e-15), key


def test_empty_batch_and_overflowing_sequence_ratio_stay_finite():
    empty = mismatch_stats(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.tensor([0, 3], dtype=torch.int32))
    assert all(v == 0.0 for v in finalize_mismatch(empty).values())
    # Σ Δ = 1000 over one sequence: e^1000 overflows; the ratio is reported as e^80, the log exactly.
    old = torch.zeros(10, dtype=torch.float64)
    got = finalize_mismatch(mismatch_stats(old, old - 100.0, torch.ones(10), torch.tensor([0, 10], dtype=torch.int32)))
    assert got["mismatch_seq_log_ratio_max"] == 1000.0 and got["mismatch_seq_ratio_max"] == math.exp(80.0)
    assert got["mismatch_geo_ratio_max"] == pytest.approx(math.exp(80.0)) and got["mismatch_abs_logp_diff"] == 100.0


def _dp_cp_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch, old, rollout = _batch(seed=3, num_seqs=11)
        full = finalize_mismatch(mismatch_stats(old, rollout, batch.loss_mask, batch.cu_seqlens))
        # Data parallel: rank r holds sequences r, r + world, ...; each packs its own micro-batch.
        cu = batch.cu_seqlens.tolist()
        mine = list(range(rank, len(cu) - 1, world))
        index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in mine])
        local_cu = torch.tensor([0, *itertools.accumulate(cu[i + 1] - cu[i] for i in mine)], dtype=torch.int32)
        local = mismatch_stats(old[index], rollout[index], batch.loss_mask[index], local_cu)
        dp = finalize_mismatch(all_reduce_mismatch(local))
        # Context parallel: every rank holds half of every sequence; the token sums then reduce like DP.
        halves = [torch.arange(cu[i], cu[i + 1]).tensor_split(world)[rank] for i in range(len(cu) - 1)]
        cp_index = torch.cat(halves)
        cp_cu = torch.tensor([0, *itertools.accumulate(h.numel() for h in halves)], dtype=torch.int32)
        cp_local = mismatch_stats(old[cp_index], rollout[cp_index], batch.loss_mask[cp_index], cp_cu,
                                  cp_group=dist.group.WORLD)
        cp = finalize_mismatch(all_reduce_mismatch(cp_local))
        for split in (dp, cp):
            for key in MISMATCH_KEYS:
                assert split[key] == pytest.approx(full[key], rel=1e-12, abs=1e-15), (rank, key)
        # A plain barrier last (on success): the collective before it may still be freed on gloo's worker thread,
        # which needs the GIL and aborts the process if the interpreter is already exiting (torch race at exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_and_context_parallel_splits_all_reduce_to_the_single_call(tmp_path):
    mp.spawn(_dp_cp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
