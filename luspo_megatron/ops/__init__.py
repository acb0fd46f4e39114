"""Fused and reference kernels behind the policy loss (DESIGN.md §3, ``ops/``)."""

from __future__ import annotations

from luspo_megatron.ops.seq_logratio import SeqSums, segment_ids, seq_logratio_reference

# The csrc extension plugs in behind this name; until it is built, the reference is the op.
seq_logratio = seq_logratio_reference


def backend() -> str:
    """Which implementation ``policy_loss`` uses: "cuda", "cpp" or "reference"."""
    return "reference"


__all__ = ["SeqSums", "backend", "segment_ids", "seq_logratio", "seq_logratio_reference"]
