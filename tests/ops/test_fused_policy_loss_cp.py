"""Context parallelism with real gloo processes: each rank holds Megatron's zigzag chunks of every
sequence (chunks r and 2·cp−1−r of 2·cp), and the CP ranks' losses sum to, and their gradients equal,
the single-process result, on the extension and on the reference, for every loss."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from luspo_megatron.algorithms.losses import AGG_MODES, LossConfig, policy_loss
from luspo_megatron.ops import fused_available, seq_logratio
from tests.algorithms.packed import random_packed_batch
from tests.ops.batches import with_empty_sequences, zigzag_indices

CASES = [("grpo", agg) for agg in AGG_MODES] + [(name, None) for name in ("gspo", "gspo_token", "luspo")]
OPTIONS = [
    {},
    {"use_tis": True, "tis_level": "token", "tis_clip": 1.5, "kl_coef": 0.1, "kl_type": "k3", "entropy_coef": 0.01},
    {"use_tis": True, "tis_level": "geometric", "tis_clip": 1.2, "kl_coef": 0.2, "kl_type": "k2"},
    {"use_tis": True, "tis_level": "sequence", "tis_mode": "mask", "tis_clip": 2.0},
    {"use_tis": True, "tis_level": "token", "tis_mode": "mask", "tis_clip": 1.3, "tis_lower": 0.8},
]
TOL = 1e-12


def _full_batch():
    gen = torch.Generator().manual_seed(1234)
    batch = random_packed_batch(gen, num_seqs=9, max_response=40, ratio_noise=1e-2, trailing_pad=5)
    return with_empty_sequences(batch, gen, count=2)


def _loss_and_grad(batch, cfg, index, cu, adv, cp_group, B, N):
    logp = batch.logp[index].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        logp, batch.old_logp[index], adv, batch.loss_mask[index], cu, cfg, num_sequences=B, num_tokens=N,
        rollout_logp=batch.rollout_logp[index], ref_logp=batch.ref_logp[index], entropy=batch.entropy[index],
        cp_group=cp_group,
    )
    loss.backward()
    return loss.detach(), logp.grad, metrics


def _worker(rank: int, cp: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
    try:
        batch = _full_batch()
        T = batch.logp.numel()
        index, local_cu = zigzag_indices(batch.cu_seqlens, cp, rank)
        # Each rank also carries some trailing padding of its own (garbage past cu_seqlens[-1]).
        pad = torch.arange(T - 5, T)
        local_index = torch.cat([index, pad])
        whole = torch.arange(T)
        B, N = batch.num_seqs, float(batch.loss_mask.sum())
        for which in ("cpp", "reference"):
            if which == "reference":
                os.environ["LUSPO_FORCE_REFERENCE"] = "1"
            else:
                os.environ.pop("LUSPO_FORCE_REFERENCE", None)
            assert fused_available(torch.device("cpu")) == (which == "cpp")
            for name, agg in CASES:
                # Without num_tokens, token-mean normalises by this call's Σ|y_i|, which is CP-global.
                for opts, tokens in [(o, N) for o in OPTIONS] + ([({}, None)] if agg == "token-mean" else []):
                    cfg = LossConfig(name=name, agg=agg, **opts)
                    adv = batch.adv_seq
                    full_loss, full_grad, full_metrics = _loss_and_grad(batch, cfg, whole, batch.cu_seqlens, adv,
                                                                        None, B, tokens)
                    loss, grad, metrics = _loss_and_grad(batch, cfg, local_index, local_cu, adv, dist.group.WORLD,
                                                         B, tokens)
                    total = loss.clone()
                    dist.all_reduce(total)
                    where = f"{which} {name} {agg} {opts} rank {rank}"
                    assert abs(float(total) - float(full_loss)) <= TOL * max(1.0, abs(float(full_loss))), where
                    torch.testing.assert_close(grad[: index.numel()], full_grad[index], rtol=0, atol=TOL, msg=where)
                    assert (grad[index.numel():] == 0).all(), where
                    # Per-sequence diagnostics are CP-global: the same on every rank as in one process.
                    seq_tis = cfg.use_tis and cfg.tis_level != "token"
                    for key in ("length_weight_share", "num_empty_seqs") + (
                        ("clip_frac", "seq_ratio_mean") if cfg.sequence_level else ()
                    ) + (("tis_truncated_frac", "tis_masked_frac", "tis_ratio_max") if seq_tis else ()):
                        assert metrics[key] == pytest.approx(full_metrics[key], abs=1e-12), (where, key)
                    tokens = torch.tensor([metrics["num_tokens"], metrics["pg_loss"]], dtype=torch.float64)
                    dist.all_reduce(tokens)
                    assert tokens[0] == full_metrics["num_tokens"], where
                    assert float(tokens[1]) == pytest.approx(full_metrics["pg_loss"], abs=1e-12), where
                    if cfg.use_tis and not seq_tis:  # token terms are split over the ranks: sums and a max
                        counts = torch.tensor([metrics["tis_num_terms"] * metrics["tis_masked_frac"],
                                               metrics["tis_num_terms"]], dtype=torch.float64)
                        dist.all_reduce(counts)
                        assert float(counts[0] / counts[1]) == pytest.approx(full_metrics["tis_masked_frac"],
                                                                             abs=1e-12), where
                        top = torch.tensor([metrics["tis_ratio_max"]], dtype=torch.float64)
                        dist.all_reduce(top, op=dist.ReduceOp.MAX)
                        assert float(top) == pytest.approx(full_metrics["tis_ratio_max"], rel=1e-12), where

            # ops.seq_logratio under CP with a rank-dependent loss: its backward must all-reduce
            # ∂L/∂S. L = Σ_r (r+1)·Σ_i c_i S_i, so ∂L/∂logp_t = m_t·c_i·Σ_r (r+1) on every rank.
            coef = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
            logp = batch.logp[local_index].clone().requires_grad_(True)
            sums = seq_logratio(logp, batch.old_logp[local_index], batch.loss_mask[local_index], local_cu,
                                rollout_logp=batch.rollout_logp[local_index], cp_group=dist.group.WORLD)
            full = seq_logratio(batch.logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens,
                                rollout_logp=batch.rollout_logp)
            torch.testing.assert_close(sums.sum_delta.detach(), full.sum_delta, rtol=0, atol=TOL)
            torch.testing.assert_close(sums.num_tokens, full.num_tokens, rtol=0, atol=0)
            torch.testing.assert_close(sums.sum_rollout_log_ratio, full.sum_rollout_log_ratio, rtol=0, atol=TOL)
            ((rank + 1) * (coef * sums.sum_delta).sum()).backward()
            seq_of = torch.repeat_interleave(torch.arange(B), (local_cu[1:] - local_cu[:-1]).long())
            expected = batch.loss_mask[index] * coef[seq_of] * sum(r + 1 for r in range(cp))
            torch.testing.assert_close(logp.grad[: index.numel()], expected, rtol=0, atol=TOL)
        # A plain barrier last (on success): the collective before it may still be freed on gloo's worker thread,
        # which needs the GIL and aborts the process if the interpreter is already exiting (torch race at exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(cp: int, tmp_path) -> None:
    mp.spawn(_worker, args=(cp, str(tmp_path / "init")), nprocs=cp, join=True)


def test_two_cp_ranks_with_zigzag_chunks_equal_the_single_process_loss_and_gradient(tmp_path):
    _spawn(2, tmp_path)


@pytest.mark.slow
def test_four_cp_ranks_with_zigzag_chunks_equal_the_single_process_loss_and_gradient(tmp_path):
    _spawn(4, tmp_path)
