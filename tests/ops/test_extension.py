"""Backend selection: the extension when built, the reference when forced, and a fallback with exactly
one warning (never an error) when the build is missing."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from luspo_megatron.algorithms import losses
from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.ops import _extension, backend, fused_available, seq_policy_loss
from tests.algorithms.packed import random_packed_batch


def _batch_and_call():
    batch = random_packed_batch(torch.Generator().manual_seed(0), num_seqs=5)

    def call():
        logp = batch.fresh_logp()
        loss, _ = policy_loss(logp, batch.old_logp, batch.adv_seq, batch.loss_mask, batch.cu_seqlens,
                              LossConfig(name="luspo"), batch.num_seqs)
        loss.backward()
        return float(loss.detach()), logp.grad

    return batch, call


def _forbid(monkeypatch, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} must not run on this backend")

    monkeypatch.setattr(losses, name, fail)


def test_policy_loss_runs_on_the_extension_when_built(monkeypatch):
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    assert backend() in ("cpp", "cuda") and fused_available(torch.device("cpu"))
    _, call = _batch_and_call()
    expected = call()
    _forbid(monkeypatch, "_policy_loss_reference")
    assert call()[0] == expected[0]


def test_force_reference_env_selects_the_pure_torch_path(monkeypatch):
    monkeypatch.setenv("LUSPO_FORCE_REFERENCE", "1")
    assert backend() == "reference"
    _forbid(monkeypatch, "_policy_loss_fused")
    loss, grad = _batch_and_call()[1]()
    assert torch.isfinite(grad).all() and loss != 0.0


def test_missing_build_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setenv("LUSPO_FORCE_REFERENCE", "1")
    expected = _batch_and_call()[1]()
    monkeypatch.delenv("LUSPO_FORCE_REFERENCE")
    monkeypatch.setitem(sys.modules, "luspo_megatron._C", None)  # `import luspo_megatron._C` now fails
    _extension._load.cache_clear()
    _extension._has_cuda_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backend() == "reference"
            batch, call = _batch_and_call()
            got = [call(), call()]
            assert backend() == "reference"
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "luspo_megatron._C is not built" in messages[0], messages
        for loss, grad in got:
            assert loss == expected[0]
            assert torch.equal(grad, expected[1])
        with pytest.raises(RuntimeError, match="not built"):
            seq_policy_loss(batch.logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, None)
    finally:
        _extension._load.cache_clear()
        _extension._has_cuda_kernels.cache_clear()


def test_cuda_backend_needs_cuda_kernels_in_the_build():
    # This CI torch is CPU-only: the build has no CUDA kernels, so "cuda" is never reported.
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("luspo::seq_logratio_phase1", "CUDA")
    assert has_cuda == (torch.version.cuda is not None)
    assert (backend() == "cuda") == (has_cuda and torch.cuda.is_available())
