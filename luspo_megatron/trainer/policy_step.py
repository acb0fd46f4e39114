"""Every rank's half of an RL step (docs/design.md §4, steps 5–6): pack, old/ref log-probs, optimize.

    step_metrics = train_on_batch(policy, batch, config, pad_token_id, timer)   # one dict per optimizer step

The rollout's B sequences are cut into mini-batches of ``--global-batch-size`` (one optimizer step
each). Each rank packs its data-parallel share of a mini-batch into micro-batches
(``data.packing``). π_old is the policy before any update of this rollout: recomputed by a
forward pass unless the step is on-policy (one mini-batch: the ratio is exactly 1) or
``--use-rollout-logprobs`` takes the engine's. ``ref_logp`` comes from the reference model when
there is one.
"""

from __future__ import annotations

import statistics
from typing import Any

from luspo_megatron.config import RunConfig
from luspo_megatron.data.packing import MicroBatch, pack_micro_batches
from luspo_megatron.trainer.batch import RolloutBatch, mini_batches
from luspo_megatron.trainer.timer import Timer


def micro_batches(policy: Any, batch: RolloutBatch, indices: range, config: RunConfig,
                  pad_token_id: int) -> list[MicroBatch]:
    """This DP rank's packed micro-batches of the sequences ``indices`` of ``batch``."""
    layout = policy.layout
    per_rank = pack_micro_batches(
        [batch.samples[i] for i in indices], [batch.advantages[i] for i in indices],
        max_tokens_per_micro_batch=config.optimizer.max_tokens_per_micro_batch, dp_size=layout.dp,
        pad_token_id=pad_token_id,
        micro_batch_multiple=layout.pp if config.parallel.virtual_pipeline_model_parallel_size else 1,
        routed_experts=config.rollout.use_rollout_routing_replay,
    )
    return per_rank[layout.dp_rank]


def train_on_batch(policy: Any, batch: RolloutBatch, config: RunConfig, pad_token_id: int,
                   timer: Timer) -> list[dict[str, float]]:
    """The optimizer steps of one rollout batch (module docstring); their metrics, in order."""
    gbs = config.optimizer.global_batch_size or len(batch.samples)
    minis = mini_batches(len(batch.samples), gbs)
    packed = [micro_batches(policy, batch, idx, config, pad_token_id) for idx in minis]
    on_policy = len(minis) == 1 and not config.rollout.use_rollout_logprobs
    for mbs in packed:
        if config.rollout.use_rollout_logprobs:
            for mb in mbs:  # π_old := the engine's policy (its log-probs, token-aligned)
                mb.old_logp = mb.rollout_logp
        elif not on_policy:  # π_old before any update of this rollout
            with timer("old_logp"):
                for mb, logp in zip(mbs, policy.compute_logprobs(mbs)):
                    mb.old_logp = logp
        if policy.reference is not None:
            with timer("ref_logp"):
                for mb, logp in zip(mbs, policy.compute_reference_logprobs(mbs)):
                    mb.ref_logp = logp
    step_metrics = []
    with timer("train"):
        for idx, mbs in zip(minis, packed):
            num_tokens = sum(len(batch.samples[i].response_ids) for i in idx)
            step_metrics.append(policy.train_step(mbs, num_sequences=len(idx), num_tokens=num_tokens))
    return step_metrics


def merge_step_metrics(step_metrics: list[dict[str, float]], has_reference: bool) -> dict[str, float]:
    """One row for the RL step: the mean over its optimizer steps, plus how many ran and were skipped."""
    merged = {key: statistics.fmean(m[key] for m in step_metrics if key in m)
              for key in step_metrics[0] if key not in ("skipped",)}
    merged["skipped_steps"] = float(sum(m.get("skipped", 0.0) for m in step_metrics))
    merged["optimizer_steps"] = float(len(step_metrics))
    if not has_reference:
        merged.setdefault("kl", float("nan"))  # no reference model: KL not measured (logged as null)
    return merged
