"""Group-relative advantages (GRPO, Dr.GRPO) and DAPO's dynamic-sampling filter. docs/design.md §2."""

from __future__ import annotations

import torch

# Added to the group std so a near-constant group does not blow up (GRPO, DeepSeekMath eq. 3).
STD_EPS = 1e-6


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size: expected a positive divisor of the number of rewards ({rewards.numel()}), "
            f"got {group_size}"
        )
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True) -> torch.Tensor:
    """Â_i = (R_i − mean_g R) / (std_g R + 1e-6), or R_i − mean_g R when ``std_normalize=False``
    (Dr.GRPO). [B] -> [B]; the G responses of a prompt are contiguous.

    std is the unbiased (Bessel-corrected) sample std, as in verl and TRL. A group whose rewards
    are all equal carries no signal and gets Â = 0 exactly (also when G = 1).
    """
    grouped = _grouped(rewards, group_size)
    compute = grouped.to(torch.float64) if grouped.dtype == torch.float64 else grouped.float()
    centred = compute - compute.mean(dim=1, keepdim=True)
    uniform = (compute == compute[:, :1]).all(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centred = centred / (compute.std(dim=1, keepdim=True) + STD_EPS)
    return torch.where(uniform, torch.zeros_like(centred), centred).reshape(-1)


def filter_uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: a bool [P] mask of the groups worth training on.

    A group whose G rewards are all equal has Â = 0 for every member, so it adds no gradient but
    still dilutes the 1/B normaliser; DAPO drops it and refills the batch with further prompts.
    """
    grouped = _grouped(rewards, group_size)
    return ~(grouped == grouped[:, :1]).all(dim=1)
