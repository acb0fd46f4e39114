"""Every attention backend of models/attention.py against a plain per-sequence causal softmax written
here in float64, on a packed (THD) batch of sequences of different lengths, with GQA.

CPU: padded, causal, reference and auto (forward and gradients; float64 to 1e-10, float32 to 1e-6
relative). CUDA (skipped without one,
run by benchmarks/gpu_check.sh): every backend in bf16 at bf16 precision, varlen and causal without a
host sync. The varlen signature adapter is checked on the CPU against stand-ins with the torch 2.10
and the torch 2.12+ signatures.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from luspo_megatron.config import ParallelConfig
from luspo_megatron.errors import ConfigError
from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe
from luspo_megatron.models.attention import (
    PackedDotProductAttention,
    check_backend,
    varlen_attention,
    varlen_supported,
)
from luspo_megatron.models.megatron_config import transformer_config

LENGTHS = [5, 1, 12, 7, 3]  # different lengths, one of a single token
HEADS, GROUPS, DIM = 4, 2, 32
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")


def _config(dtype: str = "fp32", cp: int = 1):
    arch = arch_from_hf(tiny_qwen3_moe(vocab_size=256))
    return transformer_config(arch, ParallelConfig(context_parallel_size=cp), dtype=dtype, cuda=False)


def _module(backend: str, dtype: str = "fp32") -> PackedDotProductAttention:
    return PackedDotProductAttention(_config(dtype), layer_number=1, attn_mask_type=None, attention_type="self",
                                     backend=backend)


def _batch(device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q, k, v, grad = (torch.randn(t, n, DIM, generator=gen, dtype=torch.float64)
                     for n in (HEADS, GROUPS, GROUPS, HEADS))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                             cu_seqlens_q_padded=cu.to(device), cu_seqlens_kv_padded=cu.to(device),
                             max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
    tensors = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    return tensors, grad.reshape(t, -1).to(device, dtype), params


def oracle(q, k, v, scale: float | None = None) -> torch.Tensor:
    """float64, sequence by sequence: softmax(q·kᵀ·scale + causal mask)·v, each KV head shared by
    HEADS/GROUPS query heads. q [t, h, d], k/v [t, g, d] -> [t, h·d]."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, start = [], 0
    for n in LENGTHS:
        qs, ks, vs = (x[start:start + n] for x in (q, k, v))
        ks, vs = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (ks, vs))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril().to(q.device)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs).reshape(n, -1))
        start += n
    return torch.cat(outs)


def _forward_backward(module, tensors, grad, params):
    out = module(*tensors, None, packed_seq_params=params)
    (out * grad).sum().backward()
    return out.detach(), [x.grad.detach() for x in tensors]


def _oracle_forward_backward(tensors, grad):
    ref_in = [x.detach().double().requires_grad_() for x in tensors]
    out = oracle(*ref_in)
    (out * grad.double()).sum().backward()
    return out.detach(), [x.grad for x in ref_in]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["padded", "causal", "reference", "auto"])
def test_cpu_backends_equal_the_per_sequence_softmax(backend, dtype):
    tensors, grad, params = _batch("cpu", dtype)
    out, grads = _forward_backward(_module(backend), tensors, grad, params)
    want, want_grads = _oracle_forward_backward(tensors, grad)
    assert out.dtype == dtype and out.shape == (sum(LENGTHS), HEADS * DIM)
    for got, ref in zip([out, *grads], [want, *want_grads]):
        # float64: 1e-10 absolute; float32: 1e-6 of the largest value (float32 rounding)
        tol = 1e-10 if dtype == torch.float64 else 1e-6 * ref.abs().max().item()
        assert (got.double() - ref).abs().max() < tol


def test_auto_resolves_to_padded_on_cpu_and_to_the_cp_path_with_context_parallel():
    module = _module("auto")
    (q, k, _), _, _ = _batch("cpu", torch.float32)
    assert module.resolve_backend(q, k, cp_size=1) == "padded"
    assert module.resolve_backend(q, k, cp_size=2) == "reference"
    assert _module("causal").resolve_backend(q, k, cp_size=1) == "causal"
    with pytest.raises(ValueError, match="cannot run with cp = 2"):
        _module("causal").resolve_backend(q, k, cp_size=2)


def test_bad_backends_are_refused_with_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match="^--attention-backend: expected one of"):
        check_backend("flash", _config())
    with pytest.raises(ConfigError, match="^--attention-backend: expected auto or reference with "
                                          "--context-parallel-size 2"):
        check_backend("causal", _config(cp=2))
    check_backend("reference", _config(cp=2))
    if not CUDA:
        with pytest.raises(ConfigError, match="^--attention-backend: varlen needs CUDA"):
            check_backend("varlen", _config("bf16"))
        assert not varlen_supported("cpu", torch.bfloat16, DIM, True)


# ------------------------------------------------------------------------ varlen signature adapter
def _packed_reference(query, key, value, cu, causal: bool, scale: float | None):
    assert causal, "the adapter must ask for causal attention"
    assert query.shape[1] == key.shape[1] or scale is not None, "GQA without enable_gqa"
    assert cu.dtype == torch.int32
    return oracle(query, key, value, scale).reshape(query.shape)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: no scale, no GQA."""
    assert query.shape[1] == key.shape[1], "2.10 has no GQA: heads must be repeated"
    assert max_q == max_k == max(LENGTHS)
    return _packed_reference(query, key, value, cu_seq_q, is_causal, None)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch ≥ 2.12's signature: causal is window_size (-1, 0)."""
    assert enable_gqa == (query.shape[1] != key.shape[1])
    return _packed_reference(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


@pytest.mark.parametrize("fn", [varlen_2_10, varlen_2_13])
@pytest.mark.parametrize("scale", [None, 0.1])
def test_varlen_adapter_reads_the_signature_causal_gqa_and_scale(fn, scale):
    (q, k, v), _, params = _batch("cpu", torch.float64)
    softmax_scale = 1.0 / math.sqrt(DIM) if scale is None else scale
    out = varlen_attention(q, k, v, params.cu_seqlens_q_padded, params.max_seqlen_q, softmax_scale, fn=fn)
    want = oracle(q, k, v, softmax_scale).reshape(out.shape)
    assert (out - want).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("backend", ["padded", "causal", "varlen", "reference", "auto"])
def test_cuda_bf16_backends_equal_the_per_sequence_softmax(backend):
    if backend == "varlen" and not varlen_supported("cuda", torch.bfloat16, DIM, True):
        pytest.skip("varlen attention is not available in this torch build")
    tensors, grad, params = _batch("cuda", torch.bfloat16)
    module = _module(backend, "bf16").cuda()
    out, grads = _forward_backward(module, tensors, grad, params)
    want, want_grads = _oracle_forward_backward(tensors, grad)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() < 3e-2
    for got, ref in zip(grads, want_grads):
        assert (got.double() - ref).abs().max() < 6e-2
    if backend == "auto":
        q, k, _ = tensors
        assert module.resolve_backend(q, k, cp_size=1) in ("varlen", "causal")


@needs_cuda
@pytest.mark.parametrize("backend", ["causal", "varlen"])
def test_cuda_fast_paths_do_not_synchronize_with_the_host(backend):
    if backend == "varlen" and not varlen_supported("cuda", torch.bfloat16, DIM, True):
        pytest.skip("varlen attention is not available in this torch build")
    tensors, grad, params = _batch("cuda", torch.bfloat16)
    module = _module(backend, "bf16").cuda()
    _forward_backward(module, tensors, grad, params)  # warm-up (lazy inits may sync once)
    tensors, grad, params = _batch("cuda", torch.bfloat16, seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = module(*tensors, None, packed_seq_params=params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (sum(LENGTHS), HEADS * DIM)
