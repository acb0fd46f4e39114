"""The samples of one RL step, as rank 0 collects them and every rank trains on them.

A :class:`RolloutBatch` holds B = (groups kept)·G sequences, the G samples of a prompt contiguous,
with their rewards and advantages: the one sample type (``rollout.engine.Sample``) with what the
step learned about it. It is built once, on rank 0, then broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RolloutBatch:
    """What rank 0 produces for one RL step and broadcasts."""

    samples: list  # rollout.engine.Sample
    rewards: list[float]
    advantages: list[float]
    correct: list[bool]
    prompts: list[Any]  # the raw prompt of each group, for samples.jsonl
    labels: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    """The reward function's raw score of each sample; ``rewards`` is it after overlong shaping (the same
    without ``--overlong-buffer-len``). Dynamic sampling filters on the scores."""
    prompt_indices: list[int] = field(default_factory=list)
    """The dataset index (``PromptIterator``) of each group's prompt."""


def select_groups(batch: RolloutBatch, keep: list[bool], G: int) -> RolloutBatch:
    """The groups whose ``keep`` flag is set (``keep`` has one flag per group of G samples)."""
    idx = [i for i in range(len(batch.samples)) if keep[i // G]]

    def per_sample(values: list) -> list:
        return [values[i] for i in idx] if values else []

    def per_group(values: list) -> list:
        return [v for v, k in zip(values, keep) if k]

    return RolloutBatch(
        per_sample(batch.samples), per_sample(batch.rewards), per_sample(batch.advantages),
        per_sample(batch.correct), per_group(batch.prompts), per_sample(batch.labels), dict(batch.metrics),
        per_sample(batch.texts), per_sample(batch.scores), per_group(batch.prompt_indices),
    )


def concat_batches(parts: list[RolloutBatch]) -> RolloutBatch:
    """One batch from several (dynamic-sampling rounds); counters in ``metrics`` add up."""
    out = RolloutBatch([], [], [], [], [], [], {}, [])
    for part in parts:
        out.samples += part.samples
        out.rewards += part.rewards
        out.advantages += part.advantages
        out.correct += part.correct
        out.prompts += part.prompts
        out.labels += part.labels
        out.texts += part.texts
        out.scores += part.scores
        out.prompt_indices += part.prompt_indices
        for key, value in part.metrics.items():
            out.metrics[key] = out.metrics.get(key, 0.0) + value
    return out


def mini_batches(num_sequences: int, num_steps: int) -> list[range]:
    """``num_steps`` consecutive index ranges covering ``num_sequences`` (one optimizer step each), as
    equal as possible: B/N sequences each when N divides B (a full rollout batch always does), sizes
    differing by at most one otherwise (a short dynamic-sampling batch). Fewer ranges when there are
    fewer sequences than steps; none for no sequence."""
    steps = min(num_steps, num_sequences)
    bounds = [num_sequences * k // steps for k in range(steps + 1)] if steps else [0]
    return [range(bounds[k], bounds[k + 1]) for k in range(steps)]


def sample_rows(batch: RolloutBatch, G: int, samples_per_step: int) -> list[dict[str, Any]]:
    """Every sample of the step for samples.jsonl (the logger keeps the first ``samples_per_step``),
    spread over groups first so that a few rows show different prompts; -1 keeps the order."""
    order = sorted(range(len(batch.samples)), key=lambda i: (i % G, i))
    if samples_per_step == -1:
        order = range(len(batch.samples))
    return [{"index": i, "group": i // G, "prompt": batch.prompts[i // G], "response": batch.texts[i],
             "label": batch.labels[i], "reward": batch.rewards[i], "advantage": batch.advantages[i],
             "finish": batch.samples[i].finish, "response_len": len(batch.samples[i].response_ids),
             "weight_version": batch.samples[i].weight_version,
             **({"score": batch.scores[i]} if batch.scores else {})}
            for i in order]
