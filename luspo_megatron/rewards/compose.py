"""Rewards that compose: R = Σ_k w_k · r_k(response, label, metadata).

A term is a function named by import path. Terms marked ``in_pool`` (math-verify, user rewards)
run in the :class:`~luspo_megatron.rewards.pool.RewardPool`; cheap ones (format) run in-process.

    reward = build_reward("math+format", timeout_s=5)
    result = reward(responses, labels)          # result.rewards, result.terms, result.stats
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from luspo_megatron.config.data import REWARD_KINDS  # the --reward choices live in config
from luspo_megatron.errors import ConfigError, RewardError
from luspo_megatron.rewards.format import FORMAT_SCORE
from luspo_megatron.rewards.math import AUTO_SCORE, DAPO_SCORE, MATH_SCORE
from luspo_megatron.rewards.pool import RewardPool, ScoreStats, load_function

# --reward: math = the last \boxed{}; dapo = the last "Answer:" line (DAPO-Math-17k's prompts);
# auto = the boxed answer if any, else the Answer line (rewards/math.py). The format term of
# math+format asks for a boxed answer, so it pairs with math only.
_SINGLE_TERM = {"math": MATH_SCORE, "dapo": DAPO_SCORE, "auto": AUTO_SCORE}


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: str  # "module:function", called as fn(response, label, metadata) -> float
    weight: float = 1.0
    in_pool: bool = True


@dataclass
class RewardResult:
    rewards: list[float]  # the weighted sum, one per response
    terms: dict[str, list[float]]  # each term's raw score
    stats: ScoreStats  # timeouts, errors, crashes of this call


class Reward:
    """Scores responses with weighted terms. Owns its process pool: ``close()`` it (or use ``with``)."""

    def __init__(self, terms: Sequence[RewardTerm], *, num_workers: int | None = None, timeout_s: float = 5.0,
                 pool: RewardPool | None = None) -> None:
        if not terms:
            raise ConfigError("reward: expected at least one term")
        self.terms = tuple(terms)
        self.pool = pool or RewardPool(num_workers=num_workers, timeout_s=timeout_s,
                                       preload=tuple(t.fn for t in self.terms if t.in_pool))
        self._local = {t.name: load_function(t.fn) for t in self.terms if not t.in_pool}

    def __call__(self, responses: Sequence[str], labels: Sequence[Any],
                 metadata: Sequence[Any] | None = None) -> RewardResult:
        if len(labels) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
        metadata = list(metadata) if metadata is not None else [None] * len(responses)
        items = list(zip(responses, labels, metadata))
        stats = ScoreStats()
        terms: dict[str, list[float]] = {}
        for term in self.terms:
            if term.in_pool:
                terms[term.name], term_stats = self.pool.score(term.fn, items)
                stats.add(term_stats)
            else:
                terms[term.name] = [float(self._local[term.name](*item)) for item in items]
            _check_finite(f"reward {term.name!r} ({_source(term)}) returned", terms[term.name], items)
        rewards = [sum(t.weight * terms[t.name][i] for t in self.terms) for i in range(len(items))]  # R = Σ_k w_k·r_k
        _check_finite("the weighted sum of the reward terms is", rewards, items)
        return RewardResult(rewards=rewards, terms=terms, stats=stats)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Reward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _source(term: RewardTerm) -> str:
    return f"--custom-reward-path {term.fn}" if term.name == "custom" else term.fn


def _excerpt(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _check_finite(what: str, scores: Sequence[float], items: Sequence[tuple[str, Any, Any]]) -> None:
    """A NaN or ±Inf reward would turn every advantage of its group into NaN: stop, naming the sample."""
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            response, label, _ = items[index]
            raise RewardError(f"{what} {score} for sample {index} of {len(scores)} (response {_excerpt(response)}, "
                              f"label {_excerpt(label)}): a reward must be a finite number", field="reward")


def build_reward(
    kind: str = "math", *, custom_reward_path: str | None = None, format_weight: float = 0.1,
    timeout_s: float = 5.0, num_workers: int | None = None, enable_thinking: bool = False,
) -> Reward:
    """The reward of ``--reward`` / ``--custom-reward-path`` (the custom one replaces ``kind``)."""
    if custom_reward_path is not None:
        try:
            load_function(custom_reward_path)  # fail now, in one line, not inside a worker later
        except ValueError as err:
            raise ConfigError(f"--custom-reward-path: {err}", field="custom_reward_path") from None
        terms = [RewardTerm("custom", custom_reward_path)]
    elif kind in _SINGLE_TERM:
        terms = [RewardTerm("math", _SINGLE_TERM[kind])]  # one term, named "math" whichever answer it reads
    elif kind == "math+format":
        fmt = FORMAT_SCORE + ("_thinking" if enable_thinking else "")
        terms = [RewardTerm("math", MATH_SCORE), RewardTerm("format", fmt, weight=format_weight, in_pool=False)]
    else:
        raise ConfigError(f"--reward: expected one of {REWARD_KINDS}, got {kind!r}", field="reward")
    return Reward(terms, num_workers=num_workers, timeout_s=timeout_s)


def reward_from_config(data: Any, num_workers: int | None = None) -> Reward:
    """:func:`build_reward` from a :class:`luspo_megatron.config.DataConfig`."""
    return build_reward(
        data.reward, custom_reward_path=data.custom_reward_path, format_weight=data.format_reward_weight,
        timeout_s=data.reward_timeout_s, num_workers=num_workers or data.reward_num_workers,
        enable_thinking=data.enable_thinking,
    )
