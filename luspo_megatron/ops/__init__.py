"""Fused and reference kernels behind the policy loss (docs/design.md §3, ``ops/``).

``seq_logratio`` (per-sequence sums) and ``seq_policy_loss`` (the fused loss + gradient) run on the csrc
extension when it is built for the tensors' device; ``backend()`` says which implementation
``policy_loss`` uses. Without a build everything falls back to the pure-PyTorch reference (one warning);
``LUSPO_FORCE_REFERENCE=1`` selects the reference.
"""

from __future__ import annotations

from luspo_megatron.ops._extension import backend, fused_available
from luspo_megatron.ops.fused_policy_loss import FusedPolicyLoss, PolicyLossSpec, seq_policy_loss
from luspo_megatron.ops.segments import segment_ids
from luspo_megatron.ops.seq_logratio import SeqSums, seq_logratio, seq_logratio_reference

__all__ = [
    "FusedPolicyLoss",
    "PolicyLossSpec",
    "SeqSums",
    "backend",
    "fused_available",
    "segment_ids",
    "seq_logratio",
    "seq_logratio_reference",
    "seq_policy_loss",
]
