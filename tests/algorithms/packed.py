"""Random packed (THD) batches for the loss tests: prompt tokens (mask 0), response tokens (mask 1),
sometimes masked-out tokens inside a response, empty responses and trailing padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from luspo_megatron.algorithms.losses import AGG_MODES


@dataclass
class PackedBatch:
    logp: torch.Tensor
    old_logp: torch.Tensor
    rollout_logp: torch.Tensor
    ref_logp: torch.Tensor
    entropy: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    adv_seq: torch.Tensor
    adv_tok: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def fresh_logp(self) -> torch.Tensor:
        return self.logp.detach().clone().requires_grad_(True)


def random_packed_batch(
    gen: torch.Generator,
    num_seqs: int,
    max_response: int = 50,
    ratio_noise: float = 1e-2,
    trailing_pad: int = 0,
    dtype: torch.dtype = torch.float64,
) -> PackedBatch:
    lengths, masks = [], []
    for _ in range(num_seqs):
        prompt = int(torch.randint(0, 6, (1,), generator=gen))
        response = int(torch.randint(0, max_response + 1, (1,), generator=gen))
        m = [0.0] * prompt + [1.0] * response
        if response > 2 and float(torch.rand(1, generator=gen)) < 0.3:
            m[prompt + response // 2] = 0.0  # a masked-out token inside the response
        lengths.append(len(m))
        masks.append(m)
    mask = torch.tensor([x for m in masks for x in m] + [0.0] * trailing_pad, dtype=dtype)
    total = mask.numel()
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    logp = -torch.rand(total, generator=gen, dtype=dtype) * 3
    # Per-sequence noise scales, so that some sequence ratios leave the (narrow) clip ranges and some don't.
    scales = torch.rand(num_seqs, generator=gen, dtype=dtype) * ratio_noise
    seg_scale = torch.cat([scales.repeat_interleave(torch.tensor(lengths)), torch.zeros(trailing_pad, dtype=dtype)])
    old = logp + torch.randn(total, generator=gen, dtype=dtype) * seg_scale + seg_scale * 0.5
    rollout = old + torch.randn(total, generator=gen, dtype=dtype) * 0.3
    ref = logp + torch.randn(total, generator=gen, dtype=dtype) * 0.2
    entropy = torch.rand(total, generator=gen, dtype=dtype) * 2
    adv_seq = torch.randn(num_seqs, generator=gen, dtype=dtype)
    adv_tok = torch.randn(total, generator=gen, dtype=dtype)
    return PackedBatch(logp, old, rollout, ref, entropy, mask, cu, adv_seq, adv_tok)


# The option matrix every loss implementation is checked over (eager library and fused op alike).
# The TIS bounds are chosen so that random_packed_batch's ratios (rollout = old + N(0, 0.3²) per token) fall on
# both sides of them: some terms are truncated or masked, some are kept.
OPTIONS = {
    "plain": {},
    "tis_token": {"use_tis": True, "tis_level": "token", "tis_clip": 1.5},
    "tis_sequence": {"use_tis": True, "tis_level": "sequence", "tis_clip": 1.5},
    "tis_geometric": {"use_tis": True, "tis_level": "geometric", "tis_clip": 1.05},
    "mis_token": {"use_tis": True, "tis_level": "token", "tis_mode": "mask", "tis_clip": 1.3, "tis_lower": 0.8},
    "mis_sequence": {"use_tis": True, "tis_level": "sequence", "tis_mode": "mask", "tis_clip": 3.0},
    "mis_geometric": {"use_tis": True, "tis_level": "geometric", "tis_mode": "mask", "tis_clip": 1.04,
                      "tis_lower": 0.96},
    "kl_k1": {"kl_coef": 0.3, "kl_type": "k1"},
    "kl_k2": {"kl_coef": 0.3, "kl_type": "k2"},
    "kl_k3": {"kl_coef": 0.3, "kl_type": "k3"},
    "entropy": {"entropy_coef": 0.05},
    "everything": {"use_tis": True, "tis_level": "token", "tis_clip": 1.5, "kl_coef": 0.1, "kl_type": "k3",
                   "entropy_coef": 0.01},
    "everything_mis": {"use_tis": True, "tis_level": "sequence", "tis_mode": "mask", "tis_clip": 2.0, "kl_coef": 0.1,
                       "kl_type": "k2", "entropy_coef": 0.01},
}
TIS_OPTIONS = [name for name, opts in OPTIONS.items() if opts.get("use_tis")]
CASES = [("grpo", agg) for agg in AGG_MODES] + [(name, None) for name in ("gspo", "gspo_token", "luspo")]
