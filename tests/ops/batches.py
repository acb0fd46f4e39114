"""Packed batches for the ops tests: tests.algorithms.packed plus zero-length sequences (cu_seqlens
entries repeated) and long batches, and the zigzag context-parallel split of Megatron."""

from __future__ import annotations

import dataclasses

import torch

from tests.algorithms.packed import PackedBatch, random_packed_batch


def with_empty_sequences(batch: PackedBatch, gen: torch.Generator, count: int) -> PackedBatch:
    """Insert ``count`` sequences of length 0 (|y_i| = 0, no tokens at all) at random places."""
    cu = batch.cu_seqlens.tolist()
    adv = batch.adv_seq.tolist()
    for _ in range(count):
        i = int(torch.randint(0, len(cu), (1,), generator=gen))
        cu.insert(i, cu[i])
        adv.insert(min(i, len(adv)), float(torch.randn(1, generator=gen, dtype=torch.float64)))
    return dataclasses.replace(
        batch,
        cu_seqlens=torch.tensor(cu, dtype=batch.cu_seqlens.dtype),
        adv_seq=torch.tensor(adv, dtype=batch.adv_seq.dtype),
    )


def on(batch: PackedBatch, device: str, dtype: torch.dtype | None = None) -> PackedBatch:
    """``batch`` on ``device``; floating tensors also cast to ``dtype`` when given."""

    def move(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def long_batch(gen: torch.Generator, total_tokens: int, max_response: int, ratio_noise: float = 1e-2) -> PackedBatch:
    """Roughly ``total_tokens`` tokens of random-length sequences (some empty), trailing padding."""
    num_seqs = max(1, total_tokens // (max_response // 2 + 3))
    batch = random_packed_batch(gen, num_seqs=num_seqs, max_response=max_response, ratio_noise=ratio_noise,
                                trailing_pad=7)
    return with_empty_sequences(batch, gen, count=3)


def zigzag_indices(cu_seqlens: torch.Tensor, cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's CP layout: every sequence is cut into 2·cp chunks and rank r holds chunks r and 2·cp−1−r.
    Returns the global token indices this rank holds (sequence by sequence, in that chunk order) and its
    local cu_seqlens. Lengths need not divide by 2·cp: chunks are as equal as possible, some may be empty."""
    cu = cu_seqlens.tolist()
    index, local_cu = [], [0]
    for i in range(len(cu) - 1):
        chunks = torch.arange(cu[i], cu[i + 1]).tensor_split(2 * cp)
        mine = torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])
        index.append(mine)
        local_cu.append(local_cu[-1] + mine.numel())
    flat = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return flat, torch.tensor(local_cu, dtype=torch.int32)
