"""Rewards: math-verify answers in a process pool with timeouts, a format reward, user rewards by
import path. Never imports megatron (the synthetic task of the embedded default is data: ``data/synthetic.py``)."""

from luspo_megatron.rewards.compose import Reward, RewardResult, RewardTerm, build_reward, reward_from_config
from luspo_megatron.rewards.pool import RewardPool, ScoreStats

__all__ = ["Reward", "RewardPool", "RewardResult", "RewardTerm", "ScoreStats", "build_reward", "reward_from_config"]
