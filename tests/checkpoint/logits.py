"""Logits of fixed packed sequences from our Megatron model (any layout) and from transformers."""

from __future__ import annotations

import torch

LENGTHS = (9, 14, 9)  # 32 tokens in all: divisible by tp for sequence parallelism


def sequences(vocab_size: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen) for n in LENGTHS]


def megatron_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    """[T, V] float32 logits of an unwrapped GPTModel on the packed (THD) sequences, gathered
    over tensor-parallel ranks (vocab-parallel output)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    with torch.no_grad():
        local = model.eval()(torch.cat(seqs)[None], None, None, packed_seq_params=packed)
        return gather_from_tensor_model_parallel_region(local)[0].float()


def transformers_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(input_ids=s[None]).logits[0] for s in seqs]).float()
