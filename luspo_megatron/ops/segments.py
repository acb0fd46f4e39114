"""Segment ids of packed (THD) tokens: which sequence every token belongs to."""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Sequence index of every packed token, [T] int64.

    Tokens past ``cu_seqlens[-1]`` (padding at the end of a packed micro-batch) get index B, one
    past the last sequence, so callers can reduce into B+1 slots and drop the last.
    """
    cu = cu_seqlens.to(torch.long)
    positions = torch.arange(total_tokens, device=cu.device)
    return torch.searchsorted(cu[1:].contiguous(), positions, right=True)
