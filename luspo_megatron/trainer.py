"""The RL loop of DESIGN.md §4, and the only module where the layers meet.

One RL step:

1. prompts        rank 0 draws P prompts from the resumable iterator (``data``);
2. rollouts       rank 0 asks the engines for G samples per prompt (``rollout``), token in/out;
3. rewards        scored in a process pool (``rewards``);
4. advantages     group-normalised (``algorithms``); DAPO dynamic sampling refills flat groups;
                  the batch is broadcast to every rank (no other rank talks HTTP);
5. packing        every rank packs its data-parallel share into micro-batches (``data.packing``);
6. old/ref logp   forward-only passes (skipped when on-policy or ``--use-rollout-logprobs``);
7. train          ``num_steps_per_rollout`` optimizer steps over mini-batches of
                  ``--global-batch-size`` sequences (``parallel``: Megatron schedules, loss at
                  the last stage with the GLOBAL sequence count of the mini-batch);
8. weight sync    the new weights go to the engines (pause → update → version → continue);
9. bookkeeping    metrics, samples, checkpoint, progress bar.

Robustness: a non-finite gradient skips its optimizer step (three in a row stop the run with a
checkpoint); SIGTERM / SIGINT finish the current step, save and exit; a local rollout server that
dies is restarted by a supervisor while the client retries the requests it lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from luspo_megatron.algorithms.advantages import filter_uniform_groups, group_advantages
from luspo_megatron.algorithms.losses import LossConfig
from luspo_megatron.algorithms.metrics import rollout_metrics
from luspo_megatron.config import RunConfig, config_to_yaml
from luspo_megatron.errors import UserError

logger = logging.getLogger("luspo_megatron.trainer")

# Consecutive optimizer steps with a non-finite gradient after which the run stops.
MAX_CONSECUTIVE_SKIPS = 3


class TrainingDiverged(RuntimeError):
    """The gradient was not finite for MAX_CONSECUTIVE_SKIPS optimizer steps in a row."""


@dataclass
class RolloutBatch:
    """What rank 0 produces for one RL step and broadcasts: B = (kept groups)·G sequences,
    the G samples of a prompt contiguous."""

    samples: list  # rollout.engine.Sample
    rewards: list[float]
    advantages: list[float]
    correct: list[bool]
    prompts: list[Any]  # the raw prompt of each group, for samples.jsonl
    labels: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def _any_rank(flag: bool) -> bool:
    """True when ``flag`` is set on any rank (so every rank takes the same branch)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def sampling_seed(seed: int, step: int, round_: int = 0) -> int:
    """The rollout seed of RL step ``step`` (and dynamic-sampling round): same run seed, same
    samples, whatever happened before (resume included)."""
    return (seed * 1_000_003 + step * 1_009 + round_) % (2**31 - 1)


def mini_batches(num_sequences: int, global_batch_size: int) -> list[range]:
    """Consecutive index ranges of ``global_batch_size`` sequences: one optimizer step each."""
    return [range(i, min(i + global_batch_size, num_sequences)) for i in range(0, num_sequences, global_batch_size)]


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """Build everything from a :class:`RunConfig`, then :meth:`run` the RL loop."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.log_dir = Path(config.logging.log_dir)
        self.timer = _Timer()
        self.stop_requested = False
        self.consecutive_skips = 0
        self.step = 0
        self._saved_step = -1
        self._stack = contextlib.ExitStack()

    # ---------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from luspo_megatron import run_assets as assets
        from luspo_megatron.parallel.policy import MegatronPolicy
        from luspo_megatron.parallel.state import validate_parallel

        cfg = self.config
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        # DESIGN.md §5: validate before any process group exists.
        validate_parallel(cfg.parallel, assets.arch_for_validation(cfg), world_size)
        self._init_process_group()
        self.is_rank0 = dist.get_rank() == 0
        if self.is_rank0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "config.yaml").write_text(config_to_yaml(cfg))
            self.run_assets = assets.prepare(cfg, self.log_dir / "assets")
        self.run_assets = _broadcast_object(self.run_assets if self.is_rank0 else None)
        model_cfg = dataclasses.replace(cfg.model, hf_checkpoint=str(self.run_assets.hf_dir))
        self.policy = MegatronPolicy.from_config(
            dataclasses.replace(cfg, model=model_cfg), total_steps=cfg.train_iters * self.optimizer_steps_per_rollout,
            with_reference=cfg.algorithm.kl_coef > 0 or cfg.algorithm.log_ref_kl,
        )
        self.layout = self.policy.layout
        self.loss_config = cfg.algorithm.loss_config(max_response_len=cfg.rollout.max_response_len)
        resumed = self._maybe_load()
        # The policy RL starts from: the initial model, or what the SFT warm-up made of it.
        self.start_hf_dir = Path(self.resume_state.get("start_hf_dir") or self.run_assets.hf_dir)
        if cfg.sft_warmup_steps and not resumed:
            self._sft_warmup()
            self.start_hf_dir = self.log_dir / "assets" / "hf_after_sft"
            # With the tokenizer, so that other runs can start from it (--hf-checkpoint).
            self._write_hf(self.start_hf_dir, with_tokenizer=True)
        if self.policy.reference is None and (cfg.algorithm.kl_coef > 0 or cfg.algorithm.log_ref_kl):
            from luspo_megatron.models.weights import hf_safetensors_source

            if not (self.start_hf_dir / "config.json").is_file():
                raise UserError(f"--load: the reference model's weights {self.start_hf_dir} are gone; "
                                "the KL reference is the policy RL started from")
            self.policy.load_reference(hf_safetensors_source(self.start_hf_dir))
        self._install_signal_handlers()
        if self.is_rank0:
            self._setup_rank0(resumed)
        self._sync_weights(initial=True)

    @property
    def optimizer_steps_per_rollout(self) -> int:
        cfg = self.config
        gbs = cfg.optimizer.global_batch_size or cfg.sequences_per_rollout
        steps = cfg.optimizer.num_steps_per_rollout or max(1, cfg.sequences_per_rollout // gbs)
        return steps

    def _init_process_group(self) -> None:
        if dist.is_initialized():
            return
        from luspo_megatron.parallel import cpu_compat

        cuda = torch.cuda.is_available()
        cpu_compat.apply(cuda_available=cuda)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "MASTER_ADDR" not in os.environ:  # plain `python tools/train_luspo.py`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            from luspo_megatron.rollout.local import free_port

            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if cuda else "gloo")

    def _setup_rank0(self, resumed: bool) -> None:
        from luspo_megatron.data.dataset import PromptIterator
        from luspo_megatron.logging import MetricsLogger, Progress, SampleLogger
        from luspo_megatron.rewards.compose import reward_from_config

        cfg = self.config
        self.tokenizer = self.run_assets.tokenizer()
        self.dataset = self.run_assets.dataset(self.tokenizer)
        logger.info(self.dataset.report())
        self.prompts = PromptIterator(self.dataset, cfg.rollout.rollout_batch_size, cfg.seed)
        if resumed and self.resume_state.get("data") is not None:
            self.prompts.load_state_dict(self.resume_state["data"])
        self.reward = self._stack.enter_context(reward_from_config(cfg.data))
        self.engine = self._stack.enter_context(self._start_engines())
        self.metrics_log = MetricsLogger(self.log_dir, resume_step=self.step if resumed else 0,
                                         wandb_project=cfg.logging.wandb_project, run_config=cfg.to_dict())
        self._stack.callback(self.metrics_log.close)
        self.samples_log = SampleLogger(self.log_dir, cfg.logging.sample_interval, cfg.logging.samples_per_step)
        self.progress = Progress(cfg.train_iters, start=self.step, enabled=cfg.logging.progress)
        self._stack.callback(self.progress.close)

    @contextlib.contextmanager
    def _start_engines(self):
        from luspo_megatron.rollout.sglang import SGLangEngine
        from luspo_megatron.rollout.supervisor import LocalEngines

        cfg = self.config.rollout
        if cfg.engine == "inprocess":
            from luspo_megatron.rollout.inprocess import InProcessEngine

            with InProcessEngine(self.run_assets.hf_dir, device=cfg.local_device, seed=self.config.seed,
                                 return_routed_experts=cfg.use_rollout_routing_replay) as engine:
                yield engine
            return
        if cfg.engine == "sglang":
            engine = (SGLangEngine.from_router(cfg.sglang_router, **self._client_options()) if cfg.sglang_router
                      else SGLangEngine(list(cfg.sglang_url), **self._client_options()))
            with engine:
                engine.wait_healthy(cfg.startup_timeout_s)
                yield engine
            return
        # The local engine serves the weights of the policy as it is now (a resumed run exported them).
        with LocalEngines(self.run_assets.hf_dir, cfg.num_engines, seed=self.config.seed, device=cfg.local_device,
                          log_dir=self.log_dir / "rollout_servers", startup_timeout_s=cfg.startup_timeout_s) as local:
            with SGLangEngine(local.urls, **self._client_options()) as engine:
                engine.wait_healthy(cfg.startup_timeout_s)
                local.engine = engine
                self.local_engines = local
                yield engine

    def _client_options(self) -> dict[str, Any]:
        cfg = self.config.rollout
        options = {"max_concurrency": cfg.max_concurrency, "request_timeout_s": cfg.request_timeout_s,
                   "max_retries": cfg.max_retries}
        if cfg.use_rollout_routing_replay:  # ask every server for the experts it routed each token to (R3)
            options["routed_layout"] = (self.policy.arch.num_layers, self.policy.arch.moe_router_topk)
        return options

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame) -> None:  # finish the step, save, exit (checked between steps)
            if self.stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            logger.warning("signal %s: finishing this step, then saving and exiting", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # ------------------------------------------------------------------------------ checkpoints
    def _maybe_load(self) -> bool:
        """Resume from ``--load`` (model, optimizer, scheduler, RNG, data order, step), or start
        from ``--pretrained-checkpoint`` (model weights only). True when a run was resumed."""
        from luspo_megatron.checkpoint import load_checkpoint, load_model_weights

        cfg = self.config.checkpoint
        self.resume_state: dict[str, Any] = {}
        self._weights_differ_from_assets = False
        resumed = None
        if cfg.load:
            resumed = load_checkpoint(cfg.load, self.policy.model, self.policy.optimizer, self.policy.scheduler,
                                      step=cfg.ckpt_step, load_optimizer=not cfg.no_load_optim,
                                      load_rng=not cfg.no_load_rng,
                                      # issue 19: checksums checked (damaged newest -> older one), a
                                      # missing --load is an error unless --load-if-exists
                                      verify=cfg.verify_checkpoint, missing_ok=cfg.load_if_exists)
        if resumed is None:
            if cfg.pretrained_checkpoint:
                load_model_weights(cfg.pretrained_checkpoint, self.policy.model, verify=cfg.verify_checkpoint)
                self.policy.optimizer.reload_model_params()  # the optimizer's fp32 main params follow
                self._weights_differ_from_assets = True
            return False
        self.step, self.resume_state = resumed.step, dict(resumed.extra_state or {})
        self._weights_differ_from_assets = True
        if self.resume_state.get("run_assets_fingerprint") not in (None, self.run_assets.fingerprint):
            logger.warning("resuming with a different initial model/tokenizer than the checkpoint was trained from")
        logger.info("resumed from %s at step %d", resumed.path, self.step)
        return True

    def _save(self) -> None:
        if not self.config.checkpoint.save:
            return
        from luspo_megatron.checkpoint import save_checkpoint

        state = {"data": self.prompts.state_dict() if self.is_rank0 else None,
                 "run_assets_fingerprint": self.run_assets.fingerprint, "start_hf_dir": str(self.start_hf_dir)}
        state = _broadcast_object(state)
        hf_config = json.loads((self.run_assets.hf_dir / "config.json").read_text())
        save_checkpoint(self.config.checkpoint.save, self.step, self.policy.model, self.policy.optimizer,
                        self.policy.scheduler, extra_state=state, keep_last=self.config.checkpoint.keep_last,
                        hf_config=hf_config)
        self._saved_step = self.step

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, float]]:
        """Set up, run ``train_iters`` RL steps (or resume up to it), save, and tear down. On
        SIGTERM / SIGINT the current step finishes, a checkpoint is saved and the run ends."""
        history: list[dict[str, float]] = []
        with self._stack:
            self.setup()
            interval = self.config.checkpoint.save_interval
            while self.step < self.config.train_iters:
                if _any_rank(self.stop_requested):
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
        """One RL step (the module docstring's 1–9); returns its metrics on every rank."""
        self.timer = _Timer()
        start = time.perf_counter()
        batch = self._rollout() if self.is_rank0 else None
        with self.timer("broadcast"):
            batch = _broadcast_object(batch)
        train_metrics = self._train_on(batch)
        with self.timer("sync"):
            self._sync_weights()
        metrics = {**batch.metrics, **train_metrics}
        seconds = self.timer.seconds
        metrics.update({f"time_{k}_s": v for k, v in seconds.items()})
        metrics["time_step_s"] = time.perf_counter() - start
        response_tokens = sum(len(s.response_ids) for s in batch.samples)
        all_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.samples)
        metrics["rollout_tokens_per_s"] = response_tokens / max(seconds.get("rollout", 0.0), 1e-9)
        metrics["train_tokens_per_s"] = all_tokens / max(seconds.get("train", 0.0), 1e-9)
        metrics["tokens_per_s"] = all_tokens / metrics["time_step_s"]
        if getattr(self, "local_engines", None) is not None:
            metrics["rollout_engine_restarts"] = float(self.local_engines.restarts)
        if self.is_rank0:
            self.metrics_log.log(self.step, metrics)
            self.samples_log.maybe_log(self.step, self._sample_rows(batch))
            self.progress.update(metrics)
        self._stop_if_diverged()
        return metrics

    # ---------------------------------------------------------------------- 1–4 (rank 0 only)
    def _rollout(self) -> RolloutBatch:
        """Prompts → rollouts → rewards → advantages, with DAPO dynamic sampling if asked."""
        cfg = self.config
        G = cfg.algorithm.n_samples_per_prompt
        want = cfg.rollout.rollout_batch_size
        kept: list[RolloutBatch] = []
        num_groups = dropped = 0
        rounds = 1 + (cfg.algorithm.max_dynamic_sampling_rounds if cfg.algorithm.dynamic_sampling else 0)
        for round_ in range(rounds):
            records = self.prompts.next_batch() if round_ == 0 else self.prompts.next_batch()[: want - num_groups]
            part = self._generate_and_score(records, round_)
            if cfg.algorithm.dynamic_sampling:
                keep = filter_uniform_groups(torch.tensor(part.rewards, dtype=torch.float64), G).tolist()
                dropped += keep.count(False)
                part = _select_groups(part, keep, G)
            kept.append(part)
            num_groups += len(part.samples) // G
            if num_groups >= want or not cfg.algorithm.dynamic_sampling:
                break
        batch = _concat_batches(kept)
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

    def _generate_and_score(self, records: list, round_: int) -> RolloutBatch:
        from luspo_megatron.rollout.engine import SamplingParams

        cfg = self.config
        G = cfg.algorithm.n_samples_per_prompt
        sampling = SamplingParams(
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_response_len, stop_token_ids=self.run_assets.stop_token_ids,
            seed=sampling_seed(cfg.seed, self.step, round_),
        )
        with self.timer("rollout"):
            groups = self.engine.generate([r.prompt_ids for r in records], sampling, n=G)
        samples = [s for group in groups for s in group]
        labels = [r.label for r in records for _ in range(G)]
        metadata = [r.metadata for r in records for _ in range(G)]
        with self.timer("reward"):
            texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
            result = self.reward(texts, labels, metadata)
        rewards = torch.tensor(result.rewards, dtype=torch.float64)
        adv = group_advantages(rewards, G, std_normalize=cfg.algorithm.std_normalize)
        correct = [score > 0 for score in result.terms.get("math", result.rewards)]
        metrics = {"reward_timeouts": float(result.stats.timeouts), "reward_errors": float(result.stats.errors)}
        return RolloutBatch(samples, rewards.tolist(), adv.tolist(), correct, [r.prompt for r in records],
                            labels, metrics, texts)

    # ------------------------------------------------------------------------------------ 5–7
    def _micro_batches(self, batch: RolloutBatch, indices: range) -> list:
        """This DP rank's packed micro-batches of the sequences ``indices`` (parallel.MicroBatch)."""
        from luspo_megatron.data.packing import pack_micro_batches
        from luspo_megatron.parallel.microbatch import MicroBatch

        cfg = self.config
        layout = self.layout
        samples = [batch.samples[i] for i in indices]
        per_rank = pack_micro_batches(
            samples, [batch.advantages[i] for i in indices],
            max_tokens_per_micro_batch=cfg.optimizer.max_tokens_per_micro_batch, dp_size=layout.dp,
            pad_token_id=self.run_assets.pad_token_id,
            micro_batch_multiple=layout.pp if cfg.parallel.virtual_pipeline_model_parallel_size else 1,
        )
        use_tis = cfg.algorithm.use_tis or cfg.rollout.use_rollout_logprobs
        out = []
        for mb in per_rank[layout.dp_rank]:
            routed = None
            if cfg.rollout.use_rollout_routing_replay:
                routed = _routed_experts(samples, mb)
            out.append(MicroBatch(
                tokens=mb.tokens, cu_seqlens=mb.cu_seqlens, loss_mask=mb.loss_mask, advantages=mb.advantages,
                rollout_logp=mb.rollout_logp if use_tis else None, routed_experts=routed,
            ))
        return out

    def _train_on(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.config
        gbs = cfg.optimizer.global_batch_size or len(batch.samples)
        minis = mini_batches(len(batch.samples), gbs)
        packed = [self._micro_batches(batch, idx) for idx in minis]
        on_policy = len(minis) == 1 and not cfg.rollout.use_rollout_logprobs
        for mbs in packed:
            if cfg.rollout.use_rollout_logprobs:
                for mb in mbs:  # π_old := the engine's policy (its log-probs, token-aligned)
                    mb.old_logp = mb.rollout_logp
            elif not on_policy:  # π_old before any update of this rollout
                with self.timer("old_logp"):
                    for mb, logp in zip(mbs, self.policy.compute_logprobs(mbs)):
                        mb.old_logp = logp
            if self.policy.reference is not None:
                with self.timer("ref_logp"):
                    for mb, logp in zip(mbs, self.policy.compute_reference_logprobs(mbs)):
                        mb.ref_logp = logp
        step_metrics = []
        with self.timer("train"):
            for idx, mbs in zip(minis, packed):
                num_tokens = sum(len(batch.samples[i].response_ids) for i in idx)
                metrics = self.policy.train_step(mbs, num_sequences=len(idx), num_tokens=num_tokens)
                step_metrics.append(metrics)
                self._check_finite(metrics)
        merged = {key: statistics.fmean(m[key] for m in step_metrics if key in m)
                  for key in step_metrics[0] if key not in ("skipped",)}
        merged["skipped_steps"] = float(sum(m.get("skipped", 0.0) for m in step_metrics))
        merged["optimizer_steps"] = float(len(step_metrics))
        if self.policy.reference is None:
            merged.setdefault("kl", float("nan"))  # no reference model: KL not measured (logged as null)
        return merged

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

    # ----------------------------------------------------------------------------------------- 8
    def _sync_weights(self, initial: bool = False) -> None:
        """Export the policy's weights (a collective) and hand them to the engines (rank 0)."""
        cfg = self.config
        if initial and not (cfg.sft_warmup_steps or self._weights_differ_from_assets):
            return  # the engines started from the very weights the policy loaded
        version = str(self.step)
        if cfg.rollout.weight_sync == "disk":
            path = self._write_hf(self.log_dir / "rollout_weights")
            if self.is_rank0:
                self.engine.update_weights(path, version)
            if getattr(self, "local_engines", None) is not None:
                self.local_engines.set_weights(path, version)  # a restarted server loads these
            return
        buckets = self._weight_buckets()
        if not self.is_rank0:
            return
        if cfg.rollout.weight_sync == "tensor":
            self.engine.update_weights_from_tensor(buckets, version)
        else:
            self.engine.update_weights_from_distributed(buckets, version)

    def _weight_buckets(self):
        """The policy's HF tensors in buckets of ``--update-weight-buffer-size`` bytes on rank 0
        (None elsewhere); collective."""
        from luspo_megatron.rollout.weights import bucket_by_bytes

        state = self.policy.hf_state_dict()
        if not self.is_rank0:
            return None
        return bucket_by_bytes(state.items(), self.config.rollout.update_weight_buffer_size)

    def _write_hf(self, out_dir: Path, with_tokenizer: bool = False) -> Path:
        """Write the policy as a HF model directory (atomic; rank 0 writes, every rank calls)."""
        from luspo_megatron.rollout.weight_sync import write_hf_checkpoint
        from luspo_megatron.run_assets import TOKENIZER_FILES

        buckets = self._weight_buckets()
        if self.is_rank0:
            tokenizer_dir = self.run_assets.tokenizer_dir
            extra = [tokenizer_dir / n for n in TOKENIZER_FILES if with_tokenizer and (tokenizer_dir / n).is_file()
                     and n != "generation_config.json"]
            write_hf_checkpoint(buckets, out_dir, self.run_assets.hf_dir, extra_files=extra)
        if dist.is_initialized():
            dist.barrier()
        return out_dir

    # ------------------------------------------------------------------------------- SFT warm-up
    def _sft_warmup(self) -> None:
        """``--sft-warmup-steps`` supervised steps on reference solutions before RL.

        The loss is GRPO's token-mean surrogate with Â = 1 and π_old = sg[π_θ] (on-policy): its
        gradient is −(1/N) Σ_t ∇log π(y_t), exactly the gradient of the token-mean negative
        log-likelihood, through the same Megatron step as RL. It has its own AdamW (``--sft-lr``)."""
        from luspo_megatron.config import OptimizerConfig
        from luspo_megatron.parallel import train as ptrain

        cfg = self.config
        examples = self.run_assets.sft_examples() if self.is_rank0 else None
        examples = _broadcast_object(examples)
        sft_optim = OptimizerConfig(lr=cfg.sft_lr, lr_warmup_iters=0, weight_decay=0.0, clip_grad=1.0)
        optimizer, _ = ptrain.build_optimizer(self.policy.model, sft_optim, total_steps=cfg.sft_warmup_steps,
                                              use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        nll_loss = LossConfig(name="grpo", agg="token-mean")
        batch_size = cfg.sft_batch_size
        generator = torch.Generator().manual_seed(cfg.seed)
        sft_log = (self.log_dir / "sft.jsonl").open("a") if self.is_rank0 else None
        try:
            for sft_step in range(1, cfg.sft_warmup_steps + 1):
                picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
                batch = RolloutBatch([examples[i] for i in picks], [0.0] * batch_size, [1.0] * batch_size,
                                     [True] * batch_size, [], [])
                mbs = self._micro_batches(batch, range(batch_size))
                if sft_step % 10 == 1 or sft_step == cfg.sft_warmup_steps:
                    logps = self.policy.compute_logprobs(mbs)
                    tokens = sum(float(mb.loss_mask.sum()) for mb in mbs)
                    nll = -sum(float((lp * mb.loss_mask).sum()) for lp, mb in zip(logps, mbs)) / max(tokens, 1.0)
                    if sft_log is not None:
                        sft_log.write(json.dumps({"sft_step": sft_step, "nll": nll}) + "\n")
                        sft_log.flush()
                        logger.info("SFT warm-up step %d/%d: nll %.4f", sft_step, cfg.sft_warmup_steps, nll)
                ptrain.train_step(self.policy.model, optimizer, None, mbs, nll_loss,
                                  num_sequences=batch_size, num_tokens=sum(len(e.response_ids) for e in batch.samples),
                                  temperature=1.0)
        finally:
            if sft_log is not None:
                sft_log.close()

    # ---------------------------------------------------------------------------------- logging
    def _sample_rows(self, batch: RolloutBatch) -> list[dict[str, Any]]:
        """Every sample of the step in order (the logger keeps the first ``--samples-per-step``),
        spread over groups first so that a few rows show different prompts."""
        G = self.config.algorithm.n_samples_per_prompt
        order = sorted(range(len(batch.samples)), key=lambda i: (i % G, i))
        if self.config.logging.samples_per_step == -1:
            order = range(len(batch.samples))
        return [{"index": i, "group": i // G, "prompt": batch.prompts[i // G], "response": batch.texts[i],
                 "label": batch.labels[i], "reward": batch.rewards[i], "advantage": batch.advantages[i],
                 "finish": batch.samples[i].finish, "response_len": len(batch.samples[i].response_ids)}
                for i in order]

    def _finish(self) -> None:
        from rich.console import Console

        from luspo_megatron.logging import plot_runs, read_metrics, summary_table

        self.progress.close()
        rows = read_metrics(self.log_dir / "metrics.jsonl")
        if rows:
            plot_runs({self.config.algorithm.loss: rows}, self.log_dir / "curves.png")
            Console().print(summary_table(rows))
            Console().print(f"metrics: {self.log_dir / 'metrics.jsonl'}   curves: {self.log_dir / 'curves.png'}")


# ------------------------------------------------------------------------------ batch utilities
def _select_groups(batch: RolloutBatch, keep: list[bool], G: int) -> RolloutBatch:
    idx = [i for i in range(len(batch.samples)) if keep[i // G]]
    return RolloutBatch(
        [batch.samples[i] for i in idx], [batch.rewards[i] for i in idx], [batch.advantages[i] for i in idx],
        [batch.correct[i] for i in idx], [p for p, k in zip(batch.prompts, keep) if k],
        [batch.labels[i] for i in idx], dict(batch.metrics), [batch.texts[i] for i in idx] if batch.texts else [],
    )


def _concat_batches(parts: list[RolloutBatch]) -> RolloutBatch:
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


def _routed_experts(samples: list, mb) -> torch.Tensor:
    """[num_moe_layers, T, top_k] routing of a packed micro-batch, position-aligned (R3)."""
    parts = []
    for i in mb.sample_index.tolist():
        s = samples[i]
        if s.routed_experts is None:
            raise UserError("--use-rollout-routing-replay: the rollout engine returned no routed_experts")
        r = torch.as_tensor(s.routed_experts)  # [prompt+response−1, layers, top_k]
        pad = r[-1:].clone()  # the last token is never an input position: reuse its neighbour's routing
        parts.append(torch.cat([r, pad]).permute(1, 0, 2))
    return torch.cat(parts, dim=1)
