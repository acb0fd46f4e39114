"""Chunked vocab-parallel log-probs and entropy against float64 log_softmax."""

from pathlib import Path

import pytest
import torch

from luspo_megatron.parallel.logprobs import vocab_parallel_logprobs
from tests.distributed import run_worker


def float64_reference(logits, labels, temperature):
    logsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logsm.gather(1, labels[:, None]).squeeze(1), -(logsm.exp() * logsm).sum(-1)


def random_case(tokens=33, vocab=80, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype)
    return logits, torch.randint(0, vocab, (tokens,), generator=gen), gen


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_values_and_gradients_equal_float64_log_softmax(temperature):
    logits, labels, gen = random_case()
    grad_logp, grad_entropy = torch.randn(33, generator=gen, dtype=torch.float64), torch.randn(
        33, generator=gen, dtype=torch.float64)
    ours = logits.clone().requires_grad_()
    out = vocab_parallel_logprobs(ours, labels, temperature=temperature, with_entropy=True, chunk_size=5)
    ((out.logp * grad_logp).sum() + (out.entropy * grad_entropy).sum()).backward()
    ref = logits.clone().requires_grad_()
    ref_logp, ref_entropy = float64_reference(ref, labels, temperature)
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()
    torch.testing.assert_close(out.logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.entropy, ref_entropy, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 33, 1000])
def test_chunking_equals_unchunked(chunk):
    logits, labels, _ = random_case(dtype=torch.float32)
    whole = logits.clone().requires_grad_()
    out_whole = vocab_parallel_logprobs(whole, labels, with_entropy=True, chunk_size=logits.shape[0])
    (out_whole.logp.sum() + out_whole.entropy.sum()).backward()
    chunked = logits.clone().requires_grad_()
    out = vocab_parallel_logprobs(chunked, labels, with_entropy=True, chunk_size=chunk)
    (out.logp.sum() + out.entropy.sum()).backward()
    assert torch.equal(out.logp, out_whole.logp) and torch.equal(out.entropy, out_whole.entropy)
    assert torch.equal(chunked.grad, whole.grad)


def test_bf16_logits_are_computed_in_float32():
    logits, labels, _ = random_case(dtype=torch.bfloat16)
    out = vocab_parallel_logprobs(logits, labels, with_entropy=True, chunk_size=8)
    assert out.logp.dtype == torch.float32
    ref_logp, ref_entropy = float64_reference(logits, labels, 1.0)  # of the same bf16 values
    torch.testing.assert_close(out.logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_entropy, rtol=0, atol=1e-5)


def test_inplace_backward_gives_the_same_gradient_and_reuses_the_logits_storage():
    logits, labels, _ = random_case(dtype=torch.float32)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        produced = leaf * 1.0  # a non-leaf, like the model's logits
        produced.retain_grad()
        out = vocab_parallel_logprobs(produced, labels, with_entropy=True, chunk_size=6, inplace_backward=inplace)
        (out.logp.sum() - 0.3 * out.entropy.sum()).backward()
        grads.append(leaf.grad)
        if inplace:  # the logits' own storage now holds their gradient: no [T, V] buffer was allocated
            assert torch.equal(produced.detach(), produced.grad)
    assert torch.equal(grads[0], grads[1])


def test_logp_without_entropy_and_entropy_only_gradients():
    logits, labels, _ = random_case()
    leaf = logits.clone().requires_grad_()
    vocab_parallel_logprobs(leaf, labels, chunk_size=4).logp.sum().backward()
    ref = logits.clone().requires_grad_()
    float64_reference(ref, labels, 1.0)[0].sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=0, atol=1e-12)
    leaf.grad = None
    ref.grad = None
    vocab_parallel_logprobs(leaf, labels, with_entropy=True, chunk_size=4).entropy.sum().backward()
    float64_reference(ref, labels, 1.0)[1].sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return run_worker(Path(__file__).with_name("logprobs_worker.py"), 2, tmp_path_factory.mktemp("lp") / "tp2.pt")


@pytest.mark.parametrize("dtype, tol", [("torch.float64", 1e-12), ("torch.float32", 2e-5)])
@pytest.mark.parametrize("chunk", [7, 45])
def test_tensor_parallel_vocab_shards_equal_float64_log_softmax(tp2, dtype, tol, chunk):
    result = tp2[(dtype, chunk)]
    assert result["logp"] <= tol and result["entropy"] <= tol and result["grad"] <= tol, result


def test_tensor_parallel_chunking_equals_unchunked(tp2):
    for dtype in ("torch.float64", "torch.float32"):
        assert torch.equal(tp2[(dtype, 7)]["values"], tp2[(dtype, 45)]["values"])
