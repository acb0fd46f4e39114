"""The supervised warm-up (``--sft-warmup-steps``) on reference solutions, before RL.

Same Megatron step as RL (``MegatronPolicy.supervised_step``): the token-mean NLL of the reference
responses, with its own AdamW at ``--sft-lr``. Batches of ``--sft-batch-size`` examples are drawn
with replacement from a generator seeded by the run seed, so every rank draws the same ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.config import OptimizerConfig, RunConfig
from luspo_megatron.data.packing import pack_micro_batches

logger = logging.getLogger("luspo_megatron.trainer")


def sft_warmup(policy: Any, examples: list, config: RunConfig, *, pad_token_id: int,
               log_path: Path | None) -> None:
    """Run the warm-up on ``examples`` (``assets.SFTExample``, the same list on every rank); rank 0
    passes ``log_path`` (``sft.jsonl``: the NLL every 10 steps)."""
    steps, batch_size = config.sft_warmup_steps, config.sft_batch_size
    optim = OptimizerConfig(lr=config.sft_lr, lr_warmup_iters=0, weight_decay=0.0, clip_grad=1.0)
    optimizer, _ = policy.build_optimizer(optim, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    layout = policy.layout
    log = log_path.open("a") if log_path is not None else None
    try:
        for step in range(1, steps + 1):
            picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
            chosen = [examples[i] for i in picks]
            mbs = pack_micro_batches(
                chosen, [1.0] * batch_size, max_tokens_per_micro_batch=config.optimizer.max_tokens_per_micro_batch,
                dp_size=layout.dp, pad_token_id=pad_token_id,
                micro_batch_multiple=layout.pp if config.parallel.virtual_pipeline_model_parallel_size else 1,
            )[layout.dp_rank]
            if step % 10 == 1 or step == steps:
                logps = policy.compute_logprobs(mbs)
                tokens = sum(float(mb.loss_mask.sum()) for mb in mbs)
                nll = -sum(float((lp * mb.loss_mask).sum()) for lp, mb in zip(logps, mbs)) / max(tokens, 1.0)
                if log is not None:
                    log.write(json.dumps({"sft_step": step, "nll": nll}) + "\n")
                    log.flush()
                    logger.info("SFT warm-up step %d/%d: nll %.4f", step, steps, nll)
            policy.supervised_step(mbs, optimizer, num_sequences=batch_size,
                                   num_tokens=sum(len(e.response_ids) for e in chosen))
    finally:
        if log is not None:
            log.close()
