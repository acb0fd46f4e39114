"""What the single-process model workers (``parity_worker.py``, ``recompute_worker.py``) share: the
start of a one-rank Megatron world on CPU, and one packed (THD) micro-batch's sequence parameters."""

from __future__ import annotations

import argparse

import torch

from luspo_megatron.runtime import cpu_compat


def start() -> argparse.Namespace:
    """Parse ``--out``, apply the CPU fixes, start gloo and Megatron's (trivial) parallel state."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return args


def packed_params(lengths: list[int]):
    """PackedSeqParams of sequences of ``lengths`` laid end to end, no padding."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
