"""Rank 0's half of an RL step (docs/design.md §4, steps 1–4): prompts → samples → rewards → advantages.

    collect = RolloutStep(config, engine, tokenizer, reward, prompts, stop_token_ids)
    batch = collect(step, timer)          # a RolloutBatch of B = P·G samples (fewer with DAPO filtering)

The engine samples G responses per prompt with a seed derived from (run seed, step, round), so a
run and its resume draw the same samples. Rewards are scored in the reward pool; advantages are
GRPO's group-normalised ones. With ``--dynamic-sampling`` (DAPO) groups whose rewards are all equal
are dropped and refilled from further prompts, for at most ``--max-dynamic-sampling-rounds`` rounds.
"""

from __future__ import annotations

from typing import Any

import torch

from luspo_megatron.algorithms.advantages import filter_uniform_groups, group_advantages
from luspo_megatron.algorithms.metrics import rollout_metrics
from luspo_megatron.config import RunConfig
from luspo_megatron.rollout.engine import RolloutEngine, SamplingParams
from luspo_megatron.rollout.versions import check_weight_versions
from luspo_megatron.trainer.batch import RolloutBatch, concat_batches, select_groups
from luspo_megatron.trainer.timer import Timer


def sampling_seed(seed: int, step: int, round_: int = 0) -> int:
    """The rollout seed of RL step ``step`` (and dynamic-sampling round): same run seed, same
    samples, whatever happened before (resume included)."""
    return (seed * 1_000_003 + step * 1_009 + round_) % (2**31 - 1)


class RolloutStep:
    """Collects one step's :class:`RolloutBatch` (module docstring); rank 0 only."""

    def __init__(self, config: RunConfig, engine: RolloutEngine, tokenizer: Any, reward: Any, prompts: Any,
                 stop_token_ids: tuple[int, ...]) -> None:
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self.reward, self.prompts, self.stop_token_ids = reward, prompts, stop_token_ids

    def __call__(self, step: int, timer: Timer) -> RolloutBatch:
        cfg = self.config
        G = cfg.algorithm.n_samples_per_prompt
        want = cfg.rollout.rollout_batch_size
        kept: list[RolloutBatch] = []
        num_groups = dropped = 0
        rounds = 1 + (cfg.algorithm.max_dynamic_sampling_rounds if cfg.algorithm.dynamic_sampling else 0)
        for round_ in range(rounds):
            records = self.prompts.next_batch() if round_ == 0 else self.prompts.next_batch()[: want - num_groups]
            part = self.generate_and_score(records, step, round_, timer)
            if cfg.algorithm.dynamic_sampling:
                keep = filter_uniform_groups(torch.tensor(part.rewards, dtype=torch.float64), G).tolist()
                dropped += keep.count(False)
                part = select_groups(part, keep, G)
            kept.append(part)
            num_groups += len(part.samples) // G
            if num_groups >= want or not cfg.algorithm.dynamic_sampling:
                break
        batch = concat_batches(kept)
        if num_groups == 0:  # every group was flat: nothing to learn from, but keep the step well-defined
            batch = part if kept else batch
        batch.metrics["dynamic_sampling_dropped_groups"] = float(dropped)
        batch.metrics["num_groups"] = float(len(batch.samples) // G)
        lengths = torch.tensor([len(s.response_ids) for s in batch.samples], dtype=torch.float64)
        truncated = torch.tensor([s.finish == "length" for s in batch.samples])
        batch.metrics.update(rollout_metrics(
            torch.tensor(batch.rewards, dtype=torch.float64), lengths, truncated,
            torch.tensor(batch.advantages, dtype=torch.float64), torch.tensor(batch.correct),
        ))
        return batch

    def generate_and_score(self, records: list, step: int, round_: int, timer: Timer) -> RolloutBatch:
        """G samples of each record's prompt, scored, with group advantages."""
        cfg = self.config
        G = cfg.algorithm.n_samples_per_prompt
        sampling = SamplingParams(
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_response_len, stop_token_ids=self.stop_token_ids,
            seed=sampling_seed(cfg.seed, step, round_),
        )
        with timer("rollout"):
            groups = self.engine.generate([r.prompt_ids for r in records], sampling, n=G)
        samples = [s for group in groups for s in group]
        labels = [r.label for r in records for _ in range(G)]
        metadata = [r.metadata for r in records for _ in range(G)]
        with timer("reward"):
            texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
            result = self.reward(texts, labels, metadata)
        rewards = torch.tensor(result.rewards, dtype=torch.float64)
        adv = group_advantages(rewards, G, std_normalize=cfg.algorithm.std_normalize)
        correct = [score > 0 for score in result.terms.get("math", result.rewards)]
        metrics = {"reward_timeouts": float(result.stats.timeouts), "reward_errors": float(result.stats.errors)}
        metrics["stale_samples"] = float(check_weight_versions(samples, step, cfg.rollout.max_weight_staleness))
        return RolloutBatch(samples, rewards.tolist(), adv.tolist(), correct, [r.prompt for r in records],
                            labels, metrics, texts)
