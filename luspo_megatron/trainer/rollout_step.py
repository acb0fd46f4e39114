"""Rank 0's half of an RL step (docs/design.md §4, steps 1–4): prompts → samples → rewards → advantages.

    collect = RolloutStep(config, engine, tokenizer, reward, prompts, stop_token_ids)
    batch = collect(step, timer)          # a RolloutBatch of B = P·G samples (fewer, or none, with DAPO filtering)

The engine samples G responses per prompt with a seed derived from (run seed, step, round), so a
run and its resume draw the same samples. Rewards are scored in the reward pool; with
``--overlong-buffer-len`` DAPO's soft overlong punishment is added to each score
(:func:`shape_rewards`); advantages are GRPO's group-normalised ones of the shaped reward.

Dynamic sampling (``--dynamic-sampling``, DAPO §3.2): each round generates
``--over-sampling-batch-size`` prompts, drops the groups whose G raw scores are all equal (Â = 0:
no gradient, only a diluted 1/B; the filter reads the reward function's score, not the overlong-shaped
reward, as verl's ``filter_groups.metric=acc``: a group that is all wrong at different lengths would
otherwise survive with advantages that only teach length) and keeps the rest, until the batch holds
``--rollout-batch-size`` groups or ``--max-dynamic-sampling-rounds`` extra rounds have run. Kept groups
beyond the batch are not thrown away: their prompts go back to the front of the prompt stream
(``PromptIterator.carry``, checkpointed) and are generated again, with the newer policy, next step.
Every prompt drawn is generated; none is lost from the data order. A batch that stays short is
trained as it is (logged in one line); an empty one skips training (the loop says so).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from luspo_megatron.algorithms.advantages import filter_uniform_groups, group_advantages
from luspo_megatron.algorithms.metrics import rollout_metrics
from luspo_megatron.algorithms.overlong import apply_overlong_penalty, overlong_metrics
from luspo_megatron.config import RunConfig
from luspo_megatron.rollout.engine import RolloutEngine, SamplingParams
from luspo_megatron.rollout.versions import check_weight_versions
from luspo_megatron.trainer.batch import RolloutBatch, concat_batches, select_groups
from luspo_megatron.trainer.timer import Timer

logger = logging.getLogger("luspo_megatron.trainer")


def sampling_seed(seed: int, step: int, round_: int = 0) -> int:
    """The rollout seed of RL step ``step`` (and dynamic-sampling round): same run seed, same
    samples, whatever happened before (resume included)."""
    return (seed * 1_000_003 + step * 1_009 + round_) % (2**31 - 1)


def shape_rewards(scores: torch.Tensor, samples: list, config: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The rewards advantages are computed from: ``scores`` [B] (the reward function's) plus DAPO's
    overlong penalty R_len(|y_i|) when ``--overlong-buffer-len`` is set (algorithms/overlong.py:
    0 up to L_max − L tokens, then linear down to −f at L_max, with L_max = --rollout-max-response-len);
    unchanged otherwise. Returns the shaped rewards [B] float64 and their counts (overlong_shaped, …)."""
    alg = config.algorithm
    scores = scores.to(torch.float64)
    if alg.overlong_buffer_len is None:
        return scores, {}
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
    shaped = apply_overlong_penalty(scores, lengths, config.rollout.max_response_len, alg.overlong_buffer_len,
                                    alg.overlong_penalty_factor)  # R_i + R_len(|y_i|)
    return shaped, overlong_metrics(shaped - scores)


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
        dynamic = cfg.algorithm.dynamic_sampling
        per_round = (cfg.algorithm.over_sampling_batch_size or want) if dynamic else want
        rounds = 1 + (cfg.algorithm.max_dynamic_sampling_rounds if dynamic else 0)
        kept: list[RolloutBatch] = []
        everything: list[RolloutBatch] = []  # every group generated this step, kept or not
        num_kept = dropped = carried = 0
        for round_ in range(rounds):
            indices = self.prompts.next_indices(per_round)
            part = self.generate_and_score(indices, step, round_, timer)
            everything.append(part)
            if dynamic:
                keep = filter_uniform_groups(torch.tensor(part.scores, dtype=torch.float64), G).tolist()
                dropped += keep.count(False)
                room = want - num_kept
                kept_positions = [g for g, k in enumerate(keep) if k]
                extra = kept_positions[room:]  # kept, but the batch is full: back to the prompt stream
                self.prompts.carry([indices[g] for g in extra])
                carried += len(extra)
                part = select_groups(part, [k and g not in extra for g, k in enumerate(keep)], G)
            kept.append(part)
            num_kept += len(part.samples) // G
            if num_kept >= want or not dynamic:
                break
        batch = concat_batches(kept)
        batch.metrics.update(num_groups=float(num_kept))
        if dynamic:
            every = concat_batches(everything)
            batch.metrics.update(
                dynamic_sampling_kept_groups=float(num_kept), dynamic_sampling_dropped_groups=float(dropped),
                dynamic_sampling_carried_prompts=float(carried), dynamic_sampling_rounds=float(len(everything)),
                dynamic_sampling_generated_groups=float(len(every.samples) // G),
                # the policy's reward over everything it generated (the batch's reward_mean is filtered)
                dynamic_sampling_score_mean=float(torch.tensor(every.scores, dtype=torch.float64).mean()),
            )
            if 0 < num_kept < want:
                logger.warning("step %d: dynamic sampling kept %d of %d groups in %d rounds (%d dropped with equal "
                               "rewards); training on %d sequences", step, num_kept, want, len(everything), dropped,
                               len(batch.samples))
        if batch.samples:
            self._batch_metrics(batch)
        return batch

    def _batch_metrics(self, batch: RolloutBatch) -> None:
        """Reward, length and advantage statistics of the batch trained on, and its overlong counts."""
        cfg = self.config
        lengths = torch.tensor([len(s.response_ids) for s in batch.samples], dtype=torch.float64)
        truncated = torch.tensor([s.finish == "length" for s in batch.samples])
        scores = torch.tensor(batch.scores, dtype=torch.float64)
        advantages = torch.tensor(batch.advantages, dtype=torch.float64)
        batch.metrics.update(rollout_metrics(scores, lengths, truncated, advantages, torch.tensor(batch.correct)))
        if cfg.algorithm.overlong_buffer_len is not None:
            rewards = torch.tensor(batch.rewards, dtype=torch.float64)
            batch.metrics.update(overlong_metrics(rewards - scores))
            batch.metrics["reward_shaped_mean"] = float(rewards.mean())
        if cfg.algorithm.overlong_filter:  # trainer/policy_step.py zeroes their loss mask
            batch.metrics["overlong_filtered"] = float(truncated.sum())

    def generate_and_score(self, indices: list[int], step: int, round_: int, timer: Timer) -> RolloutBatch:
        """G samples of the prompts ``indices`` (dataset indices), scored and shaped, with group advantages."""
        cfg = self.config
        G = cfg.algorithm.n_samples_per_prompt
        records = [self.prompts.dataset[i] for i in indices]
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
        scores = torch.tensor(result.rewards, dtype=torch.float64)
        rewards, _ = shape_rewards(scores, samples, cfg)
        adv = group_advantages(rewards, G, std_normalize=cfg.algorithm.std_normalize)
        correct = [score > 0 for score in result.terms.get("math", result.rewards)]
        metrics = {"reward_timeouts": float(result.stats.timeouts), "reward_errors": float(result.stats.errors)}
        metrics["stale_samples"] = float(check_weight_versions(samples, step, cfg.rollout.weight_staleness_bound))
        return RolloutBatch(samples, rewards.tolist(), adv.tolist(), correct, [r.prompt for r in records],
                            labels, metrics, texts, scores.tolist(), list(indices))
