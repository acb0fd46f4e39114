"""Per-token log-prob of the label, and entropy, from vocab-parallel logits: chunked, recomputed.

Each TP rank holds logits for its slice of the vocabulary, [T, V/tp]. With z = logits / τ (τ the
sampling temperature), per token t:

    m_t    = max_v z_tv                              (all-reduce MAX over TP)
    S_t    = Σ_v exp(z_tv − m_t)                     (all-reduce SUM over TP)
    lse_t  = m_t + log S_t
    logp_t = z_t,label − lse_t                       (label logit: SUM of the owning rank's value)
    H_t    = −Σ_v p_tv log p_tv = log S_t − Σ_v exp(z_tv − m_t)(z_tv − m_t) / S_t

The [T, V] float32 softmax never exists: tokens are processed in chunks of ``chunk_size`` (a
[chunk, V/tp] float32 buffer at a time), and the two all-reduces carry [T] vectors only (one MAX
for every token, then one SUM of the stacked [T, 3] partial sums). Backward recomputes each chunk
and needs no communication, because lse_t and H_t are already global:

    ∂logp_t/∂z_tv = 1[v = label] − p_tv          ∂H_t/∂z_tv = −p_tv (log p_tv + H_t)
    ∂/∂logits = (∂/∂z) / τ

Temperature convention: the rollout engine (SGLang, and our local server) reports the log-prob of
the sampled token under log_softmax(logits / τ) over the FULL vocabulary, without top-p/top-k
truncation; this function computes exactly that, so old/new/rollout log-probs are comparable.

``inplace_backward=True`` writes the gradient into the logits' own storage (the logits are dead
after the loss; Megatron's vocab-parallel cross-entropy reuses its input the same way). Then the
op needs no [T, V/tp] buffer of its own at all, forward or backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

# One float32 [chunk, V/tp] working buffer. A GPU pays a few kernel launches per chunk, so it wants larger
# chunks: on an H100 (T = 8192, V = 151,936, bf16) 64 MiB chunks (110 tokens) took 1.5x the naive time,
# 512 MiB (880 tokens) 1.15x at 0.18x its memory (docs/benchmarks.md, GPU section). A CPU is bound by the
# arithmetic, not launches, and keeps the smaller buffer.
DEFAULT_CHUNK_BYTES = {"cpu": 64 * 1024**2, "cuda": 512 * 1024**2}


class Logprobs(NamedTuple):
    logp: torch.Tensor  # [T] float32 (float64 for float64 logits)
    entropy: torch.Tensor | None  # [T], or None when not asked for


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def default_chunk_size(vocab_local: int, device: torch.device | str = "cpu", chunk_bytes: int | None = None) -> int:
    """Tokens per chunk: ``chunk_bytes`` (default: ``DEFAULT_CHUNK_BYTES`` of the device type) of float32."""
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return max(1, chunk_bytes // (4 * max(vocab_local, 1)))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (tests compare against a float64 oracle); bf16/fp16/fp32 work in fp32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, temperature, chunk_size, with_entropy, inplace_backward):
        tokens, vocab_local = logits.shape
        rank = dist.get_rank(group) if _group_size(group) > 1 else 0
        vocab_start = rank * vocab_local
        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < vocab_local)
        local_label = local_label.clamp(0, vocab_local - 1)

        # m_t, global: one MAX all-reduce for all tokens (max reads the logits without a copy).
        cdtype = _compute_dtype(logits)
        row_max = logits.max(dim=-1).values.to(cdtype) / temperature
        if _group_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # Partial sums per rank: S_t, z_label (0 where not owned), Σ exp(u) u.
        partial = torch.zeros(tokens, 3, dtype=cdtype, device=logits.device)
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            u = logits[start:end].to(cdtype, copy=True).div_(temperature).sub_(row_max[start:end, None])
            label_u = u.gather(1, local_label[start:end, None]).squeeze(1)
            partial[start:end, 1] = torch.where(owned[start:end], label_u + row_max[start:end], 0.0)
            e = u.exp()  # the second and last [chunk, V/tp] buffer
            partial[start:end, 0] = e.sum(dim=-1)
            if with_entropy:
                partial[start:end, 2] = e.mul_(u).sum(dim=-1)
        if _group_size(group) > 1:
            dist.all_reduce(partial, group=group)
        sum_exp, label_logit, sum_eu = partial.unbind(dim=1)
        lse = row_max + sum_exp.log()
        logp = label_logit - lse
        entropy = sum_exp.log() - sum_eu / sum_exp if with_entropy else None
        ctx.save_for_backward(logits, local_label, owned, lse, entropy if with_entropy else lse)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.inplace_backward = inplace_backward
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, local_label, owned, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        # detach() shares the storage: writing the gradient there bumps its version counter, so any
        # other user that saved these logits for backward would fail loudly instead of silently.
        grad_logits = logits.detach() if ctx.inplace_backward else torch.empty_like(logits)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        for start in range(0, logits.shape[0], chunk_size):
            end = min(start + chunk_size, logits.shape[0])
            logp_all = logits[start:end].to(lse.dtype, copy=True).div_(temperature).sub_(lse[start:end, None])
            p = logp_all.exp()
            # d/dz = g_logp · (onehot − p) − g_H · p · (log p + H) = onehot·g_logp − p · coef,
            # coef = g_logp + g_H · (log p + H); built in place: two [chunk, V/tp] buffers in all.
            g = grad_logp[start:end, None]
            if use_entropy:
                coef = logp_all.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None]).add_(g)
            else:
                coef = g
            grad = p.mul_(coef).neg_()
            hit = owned[start:end]
            rows = torch.arange(end - start, device=grad.device)[hit]
            grad[rows, local_label[start:end][hit]] += grad_logp[start:end][hit]
            grad_logits[start:end] = grad.div_(temperature)
        return grad_logits, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: "dist.ProcessGroup | None" = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> Logprobs:
    """log softmax(logits / τ)[label] per token (and the entropy), from TP-sharded logits.

    ``logits`` [T, V/tp] (this rank's vocabulary slice, rank r owns ids [r·V/tp, (r+1)·V/tp)),
    ``labels`` [T] global token ids. Returns float32 [T] tensors, identical on every TP rank,
    differentiable w.r.t. ``logits``."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [T, V] and labels [T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    chunk = chunk_size or default_chunk_size(logits.shape[1], logits.device)
    out = _VocabParallelLogprobs.apply(
        logits, labels.long(), tp_group if _group_size(tp_group) > 1 else None, float(temperature), int(chunk),
        bool(with_entropy), bool(inplace_backward),
    )
    return Logprobs(*out) if with_entropy else Logprobs(out, None)
