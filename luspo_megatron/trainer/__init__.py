"""The RL loop (docs/design.md §4): the only layer where data, rewards, rollout, models, parallel
and checkpoint meet.

- ``loop``: :class:`Trainer` — set-up and the step, on one page;
- ``rollout_step``: prompts → samples → rewards → advantages (DAPO dynamic sampling), rank 0;
- ``batch``: :class:`RolloutBatch`, the step's samples, and what is cut from it;
- ``policy_step``: packing, old/ref log-probs and the optimizer steps of one rollout batch;
- ``weights``: the policy's weights to the engines, or to a HF directory;
- ``evaluate``: held-out evaluation (avg@k, pass@k) through the run's engines and reward, rank 0;
- ``resume``: checkpoints in and out; ``sft``: the supervised warm-up; ``assets``: the files a run
  starts from; ``timer``: wall-clock per phase.
"""

from luspo_megatron.trainer.loop import MAX_CONSECUTIVE_SKIPS, Trainer, TrainingDiverged

__all__ = ["MAX_CONSECUTIVE_SKIPS", "Trainer", "TrainingDiverged"]
