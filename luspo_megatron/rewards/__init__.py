"""Rewards: math-verify answers in a process pool with timeouts, a format reward, user rewards by
import path, and the synthetic arithmetic task of the embedded default. Never imports megatron."""

from luspo_megatron.rewards.compose import Reward, RewardResult, RewardTerm, build_reward, reward_from_config
from luspo_megatron.rewards.pool import RewardPool, ScoreStats

__all__ = ["Reward", "RewardPool", "RewardResult", "RewardTerm", "ScoreStats", "build_reward", "reward_from_config"]
