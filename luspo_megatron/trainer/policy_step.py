"""Every rank's half of an RL step (docs/design.md §4, steps 5–6): pack, old/ref log-probs, optimize.

    result = train_on_batch(policy, batch, config, pad_token_id, timer, step=s)
    result.steps          # one metrics dict per optimizer step, in order
    result.rollout        # the rollout's own metrics (train–inference mismatch)

Off-policy mini-batches (slime's ``--num-steps-per-rollout``): the rollout's B sequences are split
into N = ``config.optimizer_steps_per_rollout`` consecutive mini-batches of B/N sequences, one
optimizer step each; B in the loss is the mini-batch's sequence count. A short dynamic-sampling
batch of B' < B sequences keeps the N steps over fewer sequences (sizes ⌊B'/N⌋ or ⌈B'/N⌉), fewer
when B' < N·dp (every data-parallel rank needs a sequence); an empty batch runs no step.

Each rank packs its data-parallel share of a mini-batch into micro-batches (``data.packing``).
π_old is the policy before any update of this rollout: recomputed by a forward pass unless the step
is on-policy (one mini-batch: the ratio is exactly 1, and π_old = sg[π_θ] inside the loss) or
``--use-rollout-logprobs`` takes the engine's. ``ref_logp`` comes from the reference model when there
is one. ``rollout_logp`` (the engine's) is always packed, so ``--use-tis`` always has it.
``--overlong-filter`` zeroes the loss mask of truncated responses: they stay in B, and leave the
token count N of token-mean.

Train–inference mismatch (algorithms/mismatch.py), every step, between the engine's log-probs and
π_old on the tokens the loss trains on: from the recomputed π_old over the whole rollout (all-reduced
over data parallel), or, when π_old is never recomputed, inside the loss of the first optimizer step,
where the current policy IS π_old (the whole rollout on-policy; the first mini-batch with
``--use-rollout-logprobs``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.algorithms.metrics import MAXED
from luspo_megatron.algorithms.mismatch import (
    PARTIAL_MAX_KEYS,
    PARTIAL_SUM_KEYS,
    finalize_mismatch,
    finalize_mismatch_partials,
    merge_mismatch,
    mismatch_stats,
)
from luspo_megatron.config import RunConfig
from luspo_megatron.data.packing import MicroBatch, pack_micro_batches
from luspo_megatron.trainer.batch import RolloutBatch, mini_batches
from luspo_megatron.trainer.timer import Timer

# Counts that add up over the optimizer steps of a rollout (the rollout's totals); loss and the
# fractions are averaged over the steps, maxima take the max.
STEP_COUNTS = ("num_tokens", "num_seqs", "num_empty_seqs", "num_clipped", "tis_num_terms")


@dataclass
class PolicyStepResult:
    steps: list[dict[str, float]] = field(default_factory=list)  # one per optimizer step
    rollout: dict[str, float] = field(default_factory=dict)  # per rollout: mismatch metrics


def micro_batches(policy: Any, batch: RolloutBatch, indices: range, config: RunConfig,
                  pad_token_id: int) -> list[MicroBatch]:
    """This DP rank's packed micro-batches of the sequences ``indices`` of ``batch``; with
    ``--overlong-filter`` the truncated responses have loss mask 0."""
    layout = policy.layout
    per_rank = pack_micro_batches(
        [batch.samples[i] for i in indices], [batch.advantages[i] for i in indices],
        max_tokens_per_micro_batch=config.optimizer.max_tokens_per_micro_batch, dp_size=layout.dp,
        pad_token_id=pad_token_id,
        micro_batch_multiple=layout.pp if config.parallel.virtual_pipeline_model_parallel_size else 1,
        routed_experts=config.rollout.use_rollout_routing_replay,
    )
    mbs = per_rank[layout.dp_rank]
    if config.algorithm.overlong_filter:
        for mb in mbs:
            for j, local in enumerate(mb.sample_index.tolist()):
                if batch.samples[indices[local]].finish == "length":  # DAPO overlong filtering
                    mb.loss_mask[int(mb.cu_seqlens[j]):int(mb.cu_seqlens[j + 1])] = 0.0
    return mbs


def trained_tokens(batch: RolloutBatch, indices: range, config: RunConfig) -> int:
    """N of token-mean: the response tokens of ``indices`` the loss trains on (filtered ones excluded)."""
    filtered = config.algorithm.overlong_filter
    return sum(len(batch.samples[i].response_ids) for i in indices
               if not (filtered and batch.samples[i].finish == "length"))


def train_on_batch(policy: Any, batch: RolloutBatch, config: RunConfig, pad_token_id: int,
                   timer: Timer, step: int = 0) -> PolicyStepResult:
    """The optimizer steps of one rollout batch (module docstring)."""
    num_steps = min(config.optimizer_steps_per_rollout, len(batch.samples) // policy.layout.dp)
    minis = mini_batches(len(batch.samples), num_steps)
    if not minis:
        return PolicyStepResult()
    packed = [micro_batches(policy, batch, idx, config, pad_token_id) for idx in minis]
    use_rollout = config.rollout.use_rollout_logprobs
    on_policy = len(minis) == 1 and not use_rollout
    result = PolicyStepResult()
    for mbs in packed:
        if use_rollout:
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
    if not on_policy and not use_rollout:  # π_old recomputed for every token of the rollout
        stats = merge_mismatch(mismatch_stats(mb.old_logp, mb.rollout_logp, mb.loss_mask, mb.cu_seqlens)
                               for mbs in packed for mb in mbs)
        result.rollout = finalize_mismatch(policy.all_reduce_data_parallel(stats))
    dump = Path(config.logging.dump_step_tensors) if config.logging.dump_step_tensors else None
    with timer("train"):
        for k, (idx, mbs) in enumerate(zip(minis, packed)):
            measure = k == 0 and (on_policy or use_rollout)  # the current policy is π_old here
            logp = policy.compute_logprobs(mbs) if dump is not None else None  # before the update
            metrics = policy.train_step(mbs, num_sequences=len(idx), num_tokens=trained_tokens(batch, idx, config),
                                        measure_mismatch=measure)
            if measure:
                result.rollout = finalize_mismatch_partials(metrics)
            for key in PARTIAL_SUM_KEYS + PARTIAL_MAX_KEYS:
                metrics.pop(key, None)
            result.steps.append(metrics)
            if dump is not None and torch.distributed.get_rank() == 0:
                dump_step(dump / f"step{step:04d}_opt{k + 1}.pt", mbs, logp, metrics, idx, batch, config)
    return result


def dump_step(path: Path, mbs: list[MicroBatch], logp: list[torch.Tensor], metrics: dict[str, float],
              idx: range, batch: RolloutBatch, config: RunConfig) -> None:
    """``--dump-step-tensors``: one optimizer step's inputs to the loss, and what it logged (rank 0's share)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_config = config.algorithm.loss_config(max_response_len=config.rollout.max_response_len)
    keys = ("tokens", "cu_seqlens", "loss_mask", "advantages", "old_logp", "rollout_logp", "ref_logp", "sample_index")
    torch.save({
        "micro_batches": [{**{k: getattr(mb, k) for k in keys}, "logp": lp} for mb, lp in zip(mbs, logp)],
        "num_sequences": len(idx), "num_tokens": trained_tokens(batch, idx, config), "metrics": dict(metrics),
        "loss_config": dataclasses.asdict(loss_config), "sequences": [idx.start, idx.stop],
    }, path)


def merge_step_metrics(result: PolicyStepResult, has_reference: bool) -> dict[str, float]:
    """One row for the RL step: over its optimizer steps, maxima by max (tis_ratio_max), counts
    (num_seqs, num_tokens, num_clipped, …) by sum, everything else by the mean; the last step's
    clip fraction as ``clip_frac_last``; how many steps ran and were skipped; the rollout's metrics."""
    steps = result.steps
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for m in steps for k in m if k != "skipped"):
        values = [m[key] for m in steps if key in m]
        merged[key] = (max(values) if key in MAXED else sum(values) if key in STEP_COUNTS
                       else statistics.fmean(values))
    if steps and "clip_frac" in steps[-1]:
        merged["clip_frac_last"] = steps[-1]["clip_frac"]
    merged["skipped_steps"] = float(sum(m.get("skipped", 0.0) for m in steps))
    merged["optimizer_steps"] = float(len(steps))
    if not has_reference and steps:
        merged.setdefault("kl", float("nan"))  # no reference model: KL not measured (logged as null)
    merged.update(result.rollout)
    return merged


class OptimizerStepLog:
    """``optimizer_steps.jsonl`` in the log directory (rank 0): one row per optimizer step, ``step`` (the RL
    step), ``optimizer_step`` (1 … N within it) and that step's own metrics (loss, clip_frac, kl, grad_norm,
    lr, …), where metrics.jsonl has their merge over the rollout. ``resume_step``: rows after it are dropped,
    as metrics.jsonl does (the file is rewritten by rename, so a crash leaves the old or the trimmed one)."""

    def __init__(self, log_dir: Path, resume_step: int = 0) -> None:
        self.path = Path(log_dir) / "optimizer_steps.jsonl"
        kept = []
        for line in self.path.read_text().splitlines() if self.path.exists() and resume_step else []:
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                break
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, steps: list[dict[str, float]]) -> None:
        with self.path.open("a") as f:
            for k, metrics in enumerate(steps, start=1):
                row = {"step": step, "optimizer_step": k,
                       **{key: value if math.isfinite(value) else None for key, value in metrics.items()}}
                f.write(json.dumps(row) + "\n")
