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


def select_groups(batch: RolloutBatch, keep: list[bool], G: int) -> RolloutBatch:
    """The groups whose ``keep`` flag is set (``keep`` has one flag per group of G samples)."""
    idx = [i for i in range(len(batch.samples)) if keep[i // G]]
    return RolloutBatch(
        [batch.samples[i] for i in idx], [batch.rewards[i] for i in idx], [batch.advantages[i] for i in idx],
        [batch.correct[i] for i in idx], [p for p, k in zip(batch.prompts, keep) if k],
        [batch.labels[i] for i in idx], dict(batch.metrics), [batch.texts[i] for i in idx] if batch.texts else [],
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
        for key, value in part.metrics.items():
            out.metrics[key] = out.metrics.get(key, 0.0) + value
    return out


def mini_batches(num_sequences: int, global_batch_size: int) -> list[range]:
    """Consecutive index ranges of ``global_batch_size`` sequences: one optimizer step each."""
    return [range(i, min(i + global_batch_size, num_sequences)) for i in range(0, num_sequences, global_batch_size)]


def sample_rows(batch: RolloutBatch, G: int, samples_per_step: int) -> list[dict[str, Any]]:
    """Every sample of the step for samples.jsonl (the logger keeps the first ``samples_per_step``),
    spread over groups first so that a few rows show different prompts; -1 keeps the order."""
    order = sorted(range(len(batch.samples)), key=lambda i: (i % G, i))
    if samples_per_step == -1:
        order = range(len(batch.samples))
    return [{"index": i, "group": i // G, "prompt": batch.prompts[i // G], "response": batch.texts[i],
             "label": batch.labels[i], "reward": batch.rewards[i], "advantage": batch.advantages[i],
             "finish": batch.samples[i].finish, "response_len": len(batch.samples[i].response_ids),
             "weight_version": batch.samples[i].weight_version}
            for i in order]
