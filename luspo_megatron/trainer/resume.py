"""Checkpoints in and out of the RL loop: what a run resumes from, and what it saves.

A checkpoint holds the model, the optimizer, the LR schedule and the RNG states (``checkpoint/``),
plus the loop's own state: the data order (rank 0's prompt iterator), the fingerprint of the files
the run started from, and the directory of the policy RL started from (the KL reference).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luspo_megatron.config import RunConfig
from luspo_megatron.runtime.distributed import broadcast_object

logger = logging.getLogger("luspo_megatron.trainer")


@dataclass
class ResumeState:
    """Where a run starts: ``step`` 0 unless resumed; ``extra`` is what :func:`save` stored."""

    step: int = 0
    resumed: bool = False
    weights_differ_from_assets: bool = False  # the policy no longer equals assets/hf_init
    extra: dict[str, Any] = field(default_factory=dict)


def maybe_load(config: RunConfig, policy: Any, assets_fingerprint: str) -> ResumeState:
    """Resume from ``--load`` (model, optimizer, scheduler, RNG, data order, step), or start from
    ``--pretrained-checkpoint`` (model weights only)."""
    from luspo_megatron.checkpoint import load_checkpoint, load_model_weights

    cfg = config.checkpoint
    resumed = None
    if cfg.load:
        # Every file is checked against its recorded sha256 (a damaged newest checkpoint falls back
        # to an older good one); a missing --load is an error unless --load-if-exists.
        resumed = load_checkpoint(cfg.load, policy.model, policy.optimizer, policy.scheduler, step=cfg.ckpt_step,
                                  load_optimizer=not cfg.no_load_optim, load_rng=not cfg.no_load_rng,
                                  verify=cfg.verify_checkpoint, missing_ok=cfg.load_if_exists)
    if resumed is None:
        if cfg.pretrained_checkpoint:
            load_model_weights(cfg.pretrained_checkpoint, policy.model, verify=cfg.verify_checkpoint)
            policy.optimizer.reload_model_params()  # the optimizer's fp32 main params follow
            return ResumeState(weights_differ_from_assets=True)
        return ResumeState()
    state = ResumeState(resumed.step, True, True, dict(resumed.extra_state or {}))
    if state.extra.get("run_assets_fingerprint") not in (None, assets_fingerprint):
        logger.warning("resuming with a different initial model/tokenizer than the checkpoint was trained from")
    logger.info("resumed from %s at step %d", resumed.path, state.step)
    return state


def save(config: RunConfig, step: int, policy: Any, *, data_state: Any, assets: Any, start_hf_dir: Path) -> None:
    """Save step ``step`` to ``--save`` (collective; ``data_state`` is rank 0's prompt iterator state)."""
    from luspo_megatron.checkpoint import save_checkpoint

    state = broadcast_object({"data": data_state, "run_assets_fingerprint": assets.fingerprint,
                              "start_hf_dir": str(start_hf_dir)})
    hf_config = json.loads((assets.hf_dir / "config.json").read_text())
    save_checkpoint(config.checkpoint.save, step, policy.model, policy.optimizer, policy.scheduler,
                    extra_state=state, keep_last=config.checkpoint.keep_last, hf_config=hf_config)
