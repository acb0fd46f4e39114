"""Metric reduction across micro-batches equals the full-batch metrics; rollout statistics."""

import itertools

import pytest
import torch

from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.algorithms.metrics import reduce_metrics, rollout_metrics
from tests.algorithms.packed import random_packed_batch


@pytest.mark.parametrize("tis", [("token", "truncate"), ("sequence", "mask"), ("geometric", "truncate"),
                                 ("token", "mask")], ids="-".join)
@pytest.mark.parametrize("name", ["grpo", "luspo", "gspo"])
def test_reduced_micro_batch_metrics_equal_full_batch_metrics(name, tis):
    gen = torch.Generator().manual_seed(5)
    batch = random_packed_batch(gen, num_seqs=9, ratio_noise=1e-2)
    level, mode = tis
    cfg = LossConfig(name=name, use_tis=True, tis_level=level, tis_mode=mode,
                     tis_clip={"token": 1.3, "sequence": 2.0, "geometric": 1.05}[level], kl_coef=0.1,
                     entropy_coef=0.01)
    kw = dict(num_sequences=9, num_tokens=float(batch.loss_mask.sum()))

    def run(lo, hi):
        t0, t1 = int(batch.cu_seqlens[lo]), int(batch.cu_seqlens[hi])
        _, m = policy_loss(batch.logp[t0:t1], batch.old_logp[t0:t1], batch.adv_seq[lo:hi],
                           batch.loss_mask[t0:t1], batch.cu_seqlens[lo:hi + 1] - t0, cfg,
                           rollout_logp=batch.rollout_logp[t0:t1], ref_logp=batch.ref_logp[t0:t1],
                           entropy=batch.entropy[t0:t1], **kw)
        return m

    full = run(0, 9)
    parts = [run(lo, hi) for lo, hi in itertools.pairwise([0, 2, 5, 9])]
    reduced = reduce_metrics(parts)
    # length_weight_share uses the median of the call's own sequences: not additive by design.
    for key in set(full) - {"length_weight_share"}:
        assert reduced[key] == pytest.approx(full[key], rel=1e-9, abs=1e-12), key
    frac = full["tis_masked_frac" if mode == "mask" else "tis_truncated_frac"]
    assert 0 < frac < 1 and len({p["tis_ratio_max"] for p in parts}) == 3  # the reduction had work to do


def test_rollout_metrics_against_direct_values():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    lengths = torch.tensor([10, 20, 30, 40, 50, 60])
    truncated = torch.tensor([False, False, False, False, True, True])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    m = rollout_metrics(rewards, lengths, truncated, adv)
    assert m["reward_mean"] == 0.5 and m["accuracy"] == 0.5
    assert m["response_len_mean"] == 35.0 and m["response_len_max"] == 60.0
    assert m["response_len_p50"] == 30.0  # torch.median: the lower of the two middle values
    assert m["truncation_rate"] == pytest.approx(1 / 3)
    assert m["advantage_std"] == pytest.approx(float(adv.double().std()))
