"""The CUDA kernels of csrc/ against the float64 naive oracle, the pure-PyTorch reference and the CPU kernels.

Skipped where there is no GPU or the build has no CUDA kernels (CI). On a GPU machine:

    python setup.py build_ext --inplace && python -m pytest tests/ops/test_cuda_kernels.py

The same checks as the CPU extension's (tests/ops/test_fused_policy_loss.py), on CUDA tensors: every loss
and option at 1e-10 in float64, ~1e6-token batches against the CPU kernels, bit determinism (the kernels
use no atomics: csrc/seq_logratio_cuda.cu) and low-precision inputs. Garbage on masked tokens and
opcheck run on both devices in tests/ops/test_fused_policy_loss.py.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.ops import PolicyLossSpec, backend, seq_logratio, seq_logratio_reference, seq_policy_loss
from luspo_megatron.ops._extension import _has_cuda_kernels
from tests.algorithms.packed import CASES, OPTIONS, random_packed_batch
from tests.ops.batches import long_batch, on, with_empty_sequences
from tests.ops.test_fused_policy_loss import CASE_IDS, TOL, _assert_metrics_equal, _oracle, _run, trial_uses_fixed_len

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _has_cuda_kernels()), reason="needs a GPU and a CUDA build of csrc/"
)


def test_cuda_tensors_select_the_cuda_kernels(monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    assert backend() == "cuda"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("luspo::seq_policy_loss_phase2", "CUDA")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_cuda_equals_naive_oracle_and_cpu_kernels_in_float64(name, agg, option, monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    gen = torch.Generator().manual_seed(zlib.crc32(f"ext-{name}-{agg}-{option}".encode()))
    cfg = LossConfig(name=name, agg=agg, max_response_len=64 if trial_uses_fixed_len(option) else None,
                     **OPTIONS[option])
    for trial in range(2):
        cpu = random_packed_batch(gen, num_seqs=int(torch.randint(1, 9, (1,), generator=gen)),
                                  ratio_noise=0.3 if name == "grpo" else 1e-2, trailing_pad=3 * trial)
        cpu = with_empty_sequences(cpu, gen, count=1 + trial)
        gpu = on(cpu, "cuda")
        use_tok = name in ("grpo", "gspo_token") and trial % 2
        B, N = cpu.num_seqs + 3, (float(cpu.loss_mask.sum()) + 7.0 if trial == 0 else None)

        loss, grad, metrics = _run(gpu, cfg, gpu.adv_tok if use_tok else gpu.adv_seq, B, N)
        assert loss.is_cuda and grad.is_cuda and loss.dtype == torch.float64
        cpu_loss, cpu_grad, cpu_metrics = _run(cpu, cfg, cpu.adv_tok if use_tok else cpu.adv_seq, B, N)
        naive_loss, naive_grad = _oracle(cpu, cfg, cpu.adv_tok if use_tok else cpu.adv_seq, B, N)

        assert abs(float(loss) - float(naive_loss)) <= TOL * max(1.0, abs(float(naive_loss)))
        torch.testing.assert_close(grad.cpu(), naive_grad, rtol=0, atol=TOL)
        torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=0, atol=TOL)
        _assert_metrics_equal(metrics, cpu_metrics)


@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_cuda_equals_cpu_kernels_on_a_million_float32_tokens(name, agg, monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    gen = torch.Generator().manual_seed(zlib.crc32(f"cuda-long-{name}-{agg}".encode()))
    cfg = LossConfig(name=name, agg=agg, **OPTIONS["everything"])
    cpu64 = long_batch(gen, total_tokens=1_000_000, max_response=4000, ratio_noise=0.3 if name == "grpo" else 1e-2)
    cpu, gpu = on(cpu64, "cpu", torch.float32), on(cpu64, "cuda", torch.float32)
    loss, grad, metrics = _run(gpu, cfg, gpu.adv_seq, cpu.num_seqs)
    cpu_loss, cpu_grad, cpu_metrics = _run(cpu, cfg, cpu.adv_seq, cpu.num_seqs)
    # float64 ground truth for the loss: the same inputs (already rounded to float32) in float64.
    ref_loss, _, _ = _run(on(cpu, "cpu", torch.float64), cfg, cpu64.adv_seq, cpu.num_seqs)
    # float32 accumulation over 1e6 terms in two different orders: both within 1e-5 of the float64 value.
    for got in (loss, cpu_loss):
        assert float(got) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    scale = float(cpu_grad.abs().max())
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-6 * scale)
    for key in ("num_tokens", "clip_frac", "mean_abs_log_ratio", "tis_weight_mean", "kl"):
        assert metrics[key] == pytest.approx(cpu_metrics[key], rel=1e-4, abs=1e-6), key
    assert metrics["num_clipped"] == pytest.approx(cpu_metrics["num_clipped"], abs=2)


@pytest.mark.parametrize("name,agg", [("luspo", None), ("grpo", "seq-mean-token-mean"), ("gspo_token", None)])
def test_cuda_outputs_are_bit_identical_across_runs(name, agg):
    gen = torch.Generator().manual_seed(9)
    batch = on(long_batch(gen, total_tokens=300_000, max_response=1500, ratio_noise=0.3 if name == "grpo" else 3e-3),
               "cuda", torch.float32)
    cfg = LossConfig(name=name, agg=agg)
    spec = PolicyLossSpec(loss=name, agg=cfg.agg, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high,
                          num_sequences=batch.num_seqs, tis_level="token", tis_clip=1.5, kl_type="k3", kl_coef=0.1)
    results = []
    for _ in range(3):
        logp = batch.fresh_logp()
        out = seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                              rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp)
        out.loss.backward()
        results.append((out.loss.detach(), out.table, out.sums, logp.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_inputs_accumulate_in_float32(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    batch = long_batch(gen, total_tokens=50_000, max_response=800)
    cfg = LossConfig(name="luspo", use_tis=True, kl_coef=0.1)
    results = {}
    for which, device in (("cuda", "cuda"), ("reference", "cpu")):
        if which == "reference":
            monkeypatch.setenv("LUSPO_FORCE_REFERENCE", "1")
        b = on(batch, device, dtype)
        logp = b.fresh_logp()
        loss, metrics = policy_loss(logp, b.old_logp, b.adv_seq.float(), b.loss_mask.bool(), b.cu_seqlens, cfg,
                                    b.num_seqs, rollout_logp=b.rollout_logp, ref_logp=b.ref_logp)
        loss.backward()
        assert loss.dtype == torch.float32 and logp.grad.dtype == dtype
        results[which] = (float(loss.detach()), logp.grad.float().cpu(), metrics)
    assert results["cuda"][0] == pytest.approx(results["reference"][0], rel=1e-5, abs=1e-6)
    scale = float(results["reference"][1].abs().max())
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(results["cuda"][1], results["reference"][1], rtol=2 * ulp, atol=1e-6 * scale)


def test_cuda_seq_logratio_equals_the_reference_with_gradients(monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    gen = torch.Generator().manual_seed(11)
    batch = on(with_empty_sequences(random_packed_batch(gen, num_seqs=40, trailing_pad=5), gen, 2), "cuda")
    weights = torch.arange(1.0, batch.num_seqs + 1, dtype=torch.float64, device="cuda")
    results = []
    for fn in (seq_logratio, seq_logratio_reference):
        logp = batch.fresh_logp()
        sums = fn(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, rollout_logp=batch.rollout_logp)
        (sums.sum_delta * weights).sum().backward()
        results.append((sums, logp.grad))
    (got, got_grad), (ref, ref_grad) = results
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=0)
