"""The RL objectives: pure PyTorch, no Megatron, no HTTP (docs/design.md §2)."""

from luspo_megatron.algorithms.advantages import filter_uniform_groups, group_advantages
from luspo_megatron.algorithms.losses import LOSS_NAMES, LossConfig, policy_loss

__all__ = ["LOSS_NAMES", "LossConfig", "filter_uniform_groups", "group_advantages", "policy_loss"]
