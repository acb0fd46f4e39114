"""The per-sequence log-ratio reference against a per-sequence loop, with padding and empty sequences."""

import torch

from luspo_megatron.ops import segment_ids, seq_logratio_reference


def test_segment_ids_mark_trailing_padding_with_B():
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert segment_ids(cu, 7).tolist() == [0, 0, 2, 2, 2, 3, 3]


def test_seq_logratio_reference_equals_loop_and_is_differentiable():
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 4, 4, 9, 10], dtype=torch.int32)
    T = 12  # two padding tokens at the end
    logp = torch.randn(T, generator=gen, dtype=torch.float64, requires_grad=True)
    old = torch.randn(T, generator=gen, dtype=torch.float64)
    rollout = torch.randn(T, generator=gen, dtype=torch.float64)
    mask = (torch.rand(T, generator=gen) > 0.3).double()
    mask[10:] = 0
    sums = seq_logratio_reference(logp, old, mask, cu, rollout_logp=rollout)
    for i in range(4):
        a, b = int(cu[i]), int(cu[i + 1])
        m = mask[a:b]
        expected = float(((logp.detach()[a:b] - old[a:b]) * m).sum())
        assert abs(float(sums.sum_delta[i].detach()) - expected) <= 1e-14
        assert float(sums.num_tokens[i]) == float(m.sum())
        assert torch.allclose(sums.sum_rollout_log_ratio[i], ((old[a:b] - rollout[a:b]) * m).sum(), rtol=0,
                              atol=1e-15)
    sums.sum_delta.sum().backward()
    torch.testing.assert_close(logp.grad, mask, rtol=0, atol=0)


def test_seq_logratio_on_the_extension_equals_the_reference(monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    from luspo_megatron.ops import backend, fused_available, seq_logratio
    from tests.algorithms.packed import random_packed_batch
    from tests.ops.batches import with_empty_sequences

    assert backend() in ("cpp", "cuda") and fused_available(torch.device("cpu"))
    gen = torch.Generator().manual_seed(6)
    batch = with_empty_sequences(random_packed_batch(gen, num_seqs=7, trailing_pad=4), gen, count=2)
    grads = []
    for fn in (seq_logratio, seq_logratio_reference):
        logp = batch.fresh_logp()
        sums = fn(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, rollout_logp=batch.rollout_logp)
        (sums.sum_delta * torch.arange(1.0, batch.num_seqs + 1, dtype=torch.float64)).sum().backward()
        grads.append((sums, logp.grad))
    (got, got_grad), (ref, ref_grad) = grads
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=0)
