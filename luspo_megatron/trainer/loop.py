"""The RL loop of docs/design.md §4, on one page.

One RL step:

1–4 rollout        rank 0 draws P prompts, asks the engines for G samples each, scores them and
                   computes advantages (``rollout_step.py``; DAPO dynamic sampling refills flat groups);
                   the batch is broadcast to every rank (no other rank talks HTTP);
5–6 train          every rank packs its data-parallel share, computes old/ref log-probs and runs the
                   optimizer steps of the rollout (``policy_step.py``; Megatron schedules, loss at the
                   last stage with the GLOBAL sequence count of each mini-batch);
7   weight sync    the new weights go to the engines (``weights.py``: pause → update → version → continue);
8   bookkeeping    metrics, samples, held-out evaluation when due (``evaluate.py``: step 0, every
                   ``--eval-interval`` steps, the last), checkpoint (``resume.py``), progress bar.

With ``--async-rollout`` rank 0 draws step n+1's batch on a background thread while step n trains
(``async_rollout.py``: one generation in flight, the sync waits for it, staleness ≤ 1 version).

Robustness: a non-finite gradient skips its optimizer step (three in a row stop the run with a
checkpoint); SIGTERM / SIGINT finish the current step, save and exit; a local rollout server that
dies is restarted by a supervisor while the client retries the requests it lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from luspo_megatron.config import RunConfig, config_to_yaml
from luspo_megatron.config.loader import redacted
from luspo_megatron.errors import UserError
from luspo_megatron.runtime.distributed import any_rank, broadcast_object, init_process_group
from luspo_megatron.trainer import assets as run_assets
from luspo_megatron.trainer import async_rollout, resume
from luspo_megatron.trainer.batch import RolloutBatch, sample_rows
from luspo_megatron.trainer.policy_step import OptimizerStepLog, merge_step_metrics, train_on_batch
from luspo_megatron.trainer.timer import Timer
from luspo_megatron.trainer.weights import sync_weights, write_hf

logger = logging.getLogger("luspo_megatron.trainer")

# Consecutive optimizer steps with a non-finite gradient after which the run stops.
MAX_CONSECUTIVE_SKIPS = 3


class TrainingDiverged(RuntimeError):
    """The gradient was not finite for MAX_CONSECUTIVE_SKIPS optimizer steps in a row."""


class Trainer:
    """Build everything from a :class:`RunConfig`, then :meth:`run` the RL loop."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config = async_rollout.effective_config(config)  # --async-correction bypass
        self.log_dir = Path(config.logging.log_dir)
        self.timer = Timer()
        self.stop_requested = False
        self.consecutive_skips = 0
        self.step = 0
        self._saved_step = -1
        self._stack = contextlib.ExitStack()
        self.engine = None  # rank 0 only
        self.async_rollout: async_rollout.AsyncRollout | None = None  # rank 0 with --async-rollout

    # ---------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from luspo_megatron.parallel.policy import MegatronPolicy
        from luspo_megatron.parallel.state import validate_parallel

        cfg = self.config
        # docs/design.md §5: validate before any process group exists.
        validate_parallel(cfg.parallel, run_assets.arch_for_validation(cfg), int(os.environ.get("WORLD_SIZE", "1")))
        init_process_group()
        self.is_rank0 = torch.distributed.get_rank() == 0
        assets = None
        if self.is_rank0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "config.yaml").write_text(config_to_yaml(cfg))
            assets = run_assets.prepare(cfg, self.log_dir / "assets")
        self.assets = assets = broadcast_object(assets)
        model_cfg = dataclasses.replace(cfg.model, hf_checkpoint=str(assets.hf_dir))
        self.policy = MegatronPolicy.from_config(
            dataclasses.replace(cfg, model=model_cfg), total_steps=cfg.train_iters * self.optimizer_steps_per_rollout,
            with_reference=cfg.algorithm.kl_coef > 0 or cfg.algorithm.log_ref_kl,
        )
        self.resume_state = resume.maybe_load(cfg, self.policy, assets.fingerprint)
        self.step = self.resume_state.step
        # The policy RL starts from: the initial model, or what the SFT warm-up made of it.
        self.start_hf_dir = Path(self.resume_state.extra.get("start_hf_dir") or assets.hf_dir)
        if cfg.sft_warmup_steps and not self.resume_state.resumed:
            self._sft_warmup()
        if cfg.algorithm.kl_coef > 0 or cfg.algorithm.log_ref_kl:
            from luspo_megatron.models.weights import hf_safetensors_source

            if not (self.start_hf_dir / "config.json").is_file():
                raise UserError(f"--load: the reference model's weights {self.start_hf_dir} are gone; "
                                "the KL reference is the policy RL started from")
            self.policy.load_reference(hf_safetensors_source(self.start_hf_dir))
        self._install_signal_handlers()
        if self.is_rank0:
            self._setup_rank0()
        # The engines start from assets/hf_init: push the policy unless it is exactly that.
        if cfg.sft_warmup_steps or self.resume_state.weights_differ_from_assets:
            self._sync_weights()

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """N of --num-steps-per-rollout / --global-batch-size: the LR schedule spans train_iters · N steps."""
        return self.config.optimizer_steps_per_rollout

    def _sft_warmup(self) -> None:
        from luspo_megatron.trainer.sft import sft_warmup

        examples = broadcast_object(self.assets.sft_examples() if self.is_rank0 else None)
        sft_warmup(self.policy, examples, self.config, pad_token_id=self.assets.pad_token_id,
                   log_path=self.log_dir / "sft.jsonl" if self.is_rank0 else None)
        self.start_hf_dir = self.log_dir / "assets" / "hf_after_sft"
        # With the tokenizer, so that other runs can start from it (--hf-checkpoint).
        tokenizer_dir = self.assets.tokenizer_dir
        extra = [tokenizer_dir / n for n in run_assets.TOKENIZER_FILES
                 if (tokenizer_dir / n).is_file() and n != "generation_config.json"]
        write_hf(self.policy, self.start_hf_dir, self.assets.hf_dir, is_rank0=self.is_rank0, extra_files=extra,
                 bucket_bytes=self.config.rollout.update_weight_buffer_size)

    def _setup_rank0(self) -> None:
        from luspo_megatron.data.dataset import PromptIterator
        from luspo_megatron.logging import MetricsLogger, Progress, SampleLogger
        from luspo_megatron.rewards.compose import reward_from_config
        from luspo_megatron.rollout.fleet import start_fleet
        from luspo_megatron.trainer.evaluate import EVAL_SAMPLES, Evaluator
        from luspo_megatron.trainer.rollout_step import RolloutStep

        cfg = self.config
        tokenizer = self.assets.tokenizer()
        dataset = self.assets.dataset(tokenizer)
        logger.info(dataset.report())
        self.prompts = PromptIterator(dataset, cfg.rollout.rollout_batch_size, cfg.seed)
        if self.resume_state.resumed and self.resume_state.extra.get("data") is not None:
            self.prompts.load_state_dict(self.resume_state.extra["data"])
        reward = self._stack.enter_context(reward_from_config(cfg.data))
        routed = ((self.policy.arch.num_layers, self.policy.arch.moe_router_topk)
                  if cfg.rollout.use_rollout_routing_replay else None)
        self.engine = self._stack.enter_context(start_fleet(
            cfg.rollout, hf_dir=self.assets.hf_dir, seed=cfg.seed, log_dir=self.log_dir, routed_layout=routed))
        self.collect = RolloutStep(cfg, self.engine, tokenizer, reward, self.prompts, self.assets.stop_token_ids)
        if cfg.rollout.async_rollout:  # step n+1 is generated while step n trains (closed before the engines)
            self.async_rollout = self._stack.enter_context(async_rollout.AsyncRollout(
                self.collect, self.prompts, last_step=cfg.train_iters))
        resumed_step = self.step if self.resume_state.resumed else 0
        self.metrics_log = MetricsLogger(self.log_dir, resume_step=resumed_step,
                                         wandb_project=cfg.logging.wandb_project, run_config=redacted(cfg.to_dict()))
        self._stack.callback(self.metrics_log.close)
        self.optimizer_log = OptimizerStepLog(self.log_dir, resumed_step)
        self.samples_log = SampleLogger(self.log_dir, cfg.logging.sample_interval, cfg.logging.samples_per_step)
        self.evaluator = Evaluator(cfg, self.engine, tokenizer, reward, self.assets.stop_token_ids,  # --eval-data
                                   samples_path=self.log_dir / EVAL_SAMPLES, resume_step=resumed_step)
        self.progress = Progress(cfg.train_iters, start=self.step, enabled=cfg.logging.progress,
                                 log_interval=cfg.logging.log_interval)
        self._stack.callback(self.progress.close)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame) -> None:  # finish the step, save, exit (checked between steps)
            if self.stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            logger.warning("signal %s: finishing this step, then saving and exiting", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, float]]:
        """Set up, run ``train_iters`` RL steps (or resume up to it), save, and tear down. On
        SIGTERM / SIGINT the current step finishes, a checkpoint is saved and the run ends."""
        history: list[dict[str, float]] = []
        with self._stack:
            self.setup()
            if self.is_rank0 and self.step == 0 and self.evaluator.due(0):  # held-out evaluation before training
                self.metrics_log.log(0, self.evaluator(0))
            interval = self.config.checkpoint.save_interval
            while self.step < self.config.train_iters:
                if any_rank(self.stop_requested):
                    logger.warning("stopping at step %d on request", self.step)
                    break
                self.step += 1
                history.append(self.train_one_step())
                if interval and self.step % interval == 0:
                    self._save()
            if self._saved_step != self.step:  # the end of the run, or a requested stop
                self._save()
            if self.is_rank0:
                self._finish()
        return history

    def train_one_step(self) -> dict[str, float]:
        """One RL step (the module docstring's 1–8); returns its metrics on every rank."""
        self.timer = Timer()
        start = time.perf_counter()
        staleness: dict[str, float] = {}
        if self.async_rollout is not None:  # drawn ahead on the generation thread (rank 0 only)
            batch, staleness = self.async_rollout.take(self.step, self.timer)
        else:
            batch: RolloutBatch = self.collect(self.step, self.timer) if self.is_rank0 else None
        with self.timer("broadcast"):
            batch = broadcast_object(batch)
        result = train_on_batch(self.policy, batch, self.config, self.assets.pad_token_id, self.timer, step=self.step)
        for metrics in result.steps:
            self._check_finite(metrics)
        train_metrics = merge_step_metrics(result, has_reference=self.policy.reference is not None)
        if not result.steps and self.is_rank0:  # dynamic sampling left nothing to learn from
            logger.warning("step %d: no training: %s; weights unchanged", self.step, _why_no_training(batch))
        if self.async_rollout is not None:
            self.async_rollout.wait_idle()  # the engines finish G(step+1) before they take new weights
        # Synced even when unchanged: after step s the engines hold version s, which is what the samples of
        # step s + 1 are checked against (rollout/versions.py).
        with self.timer("sync"):
            self._sync_weights()
        metrics = {**batch.metrics, **train_metrics, **staleness}
        seconds = self.timer.seconds
        metrics.update({f"time_{k}_s": v for k, v in seconds.items()})
        end = time.perf_counter()
        metrics["time_step_s"] = end - start
        if self.async_rollout is not None:
            metrics.update(self.async_rollout.step_metrics(start, end))
        response_tokens = sum(len(s.response_ids) for s in batch.samples)
        all_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.samples)
        metrics["rollout_tokens_per_s"] = response_tokens / max(seconds.get("rollout", 0.0), 1e-9)
        metrics["train_tokens_per_s"] = all_tokens / max(seconds.get("train", 0.0), 1e-9)
        metrics["tokens_per_s"] = all_tokens / metrics["time_step_s"]
        if self.is_rank0:
            metrics.update(self.engine.metrics())
            if self.evaluator.due(self.step):  # the engines hold this step's weights (synced above)
                metrics.update(self.evaluator(self.step))
            if self.async_rollout is not None and not self.stop_requested:
                self.async_rollout.submit(self.step + 2)  # on this step's weights, while step+1 trains
            self.metrics_log.log(self.step, metrics)
            self.optimizer_log.log(self.step, result.steps)
            self.samples_log.maybe_log(self.step, sample_rows(batch, self.config.algorithm.n_samples_per_prompt,
                                                              self.config.logging.samples_per_step))
            self.progress.update(metrics)
        self._stop_if_diverged()
        return metrics

    def _sync_weights(self) -> None:
        """Export the policy's weights (a collective) and hand them to the engines (rank 0)."""
        sync_weights(self.policy, self.engine, str(self.step))

    def _save(self) -> None:
        if not self.config.checkpoint.save:
            return
        data_state = None
        if self.is_rank0:  # async: from before the draws not trained on yet, so a resume redraws them
            data_state = self.async_rollout.data_state() if self.async_rollout else self.prompts.state_dict()
        resume.save(self.config, self.step, self.policy, data_state=data_state, assets=self.assets,
                    start_hf_dir=self.start_hf_dir)
        self._saved_step = self.step

    # --------------------------------------------------------------------------- non-finite steps
    def _check_finite(self, metrics: dict[str, float]) -> None:
        finite = math.isfinite(metrics.get("loss", 0.0)) and not metrics.get("skipped", 0.0)
        self.consecutive_skips = 0 if finite else self.consecutive_skips + 1
        if not finite:
            logger.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): optimizer step skipped",
                           self.step, metrics.get("loss"), metrics.get("grad_norm"))

    def _stop_if_diverged(self) -> None:
        """After the step's metrics are logged: three skipped optimizer steps in a row end the run."""
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            self._save()
            raise TrainingDiverged(
                f"{MAX_CONSECUTIVE_SKIPS} optimizer steps in a row had a non-finite loss or gradient at RL step "
                f"{self.step}; a checkpoint was saved. Lower --lr, raise --clip-grad, or check the data."
            )

    def _finish(self) -> None:
        from rich.console import Console

        from luspo_megatron.logging import plot_runs, read_metrics, summary_table

        self.progress.close()
        rows = read_metrics(self.log_dir / "metrics.jsonl")
        if rows:
            plot_runs({self.config.algorithm.loss: rows}, self.log_dir / "curves.png")
            Console().print(summary_table(rows))
            Console().print(f"metrics: {self.log_dir / 'metrics.jsonl'}   curves: {self.log_dir / 'curves.png'}")


def _why_no_training(batch: RolloutBatch) -> str:
    """The one-line reason an RL step has no optimizer step."""
    m = batch.metrics
    if not batch.samples:
        return (f"dynamic sampling kept no group in {int(m.get('dynamic_sampling_rounds', 1))} rounds "
                f"({int(m.get('dynamic_sampling_dropped_groups', 0))} groups dropped, all G rewards equal)")
    return f"{len(batch.samples)} sequences cannot fill every data-parallel rank"
