"""The Megatron-Core policy as the trainer uses it: one object from the run config.

    policy = MegatronPolicy.from_config(run_config, total_steps=n_optimizer_steps)
    old = policy.compute_logprobs(micro_batches)            # forward only, token-aligned [T] each
    for mb, logp in zip(micro_batches, old): mb.old_logp = logp
    metrics = policy.train_step(micro_batches)               # one optimizer step
    for name, tensor in policy.hf_weights(): ...             # every rank (collective): its own HF tensors

Weights: ``--hf-checkpoint`` is read through ``models.hf_map`` (each rank slices its part);
without it the tiny preset's Hugging Face model is initialised in transformers with the run seed
and loaded the same way, so the weights do not depend on the parallel layout (Megatron's own
initialiser differs across PP/EP layouts) and the rollout engine can start from the identical
model (``models.initial.initial_hf_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state as ps

from luspo_megatron.algorithms.losses import LossConfig
from luspo_megatron.algorithms.mismatch import MismatchStats, all_reduce_mismatch
from luspo_megatron.config import OptimizerConfig, RunConfig
from luspo_megatron.data.packing import MicroBatch
from luspo_megatron.errors import ConfigError
from luspo_megatron.models.arch import QwenArch, arch_from_hf
from luspo_megatron.models.build import build_model, transformer_engine_available
from luspo_megatron.models.hf_map import TensorSource, hf_name_map, megatron_naming
from luspo_megatron.models.initial import hf_config_of, initial_hf_state_dict
from luspo_megatron.models.megatron_config import DTYPES, transformer_config
from luspo_megatron.models.weights import hf_safetensors_source, load_hf_weights
from luspo_megatron.parallel import train
from luspo_megatron.parallel.export import export_policy_weights
from luspo_megatron.parallel.state import Layout, init_parallel

NLL_LOSS = LossConfig(name="grpo", agg="token-mean")  # with Â = 1, on-policy: the token-mean NLL's gradient


def resolve_transformer_engine(requested: bool) -> bool:
    """TE layer specs when asked (``--transformer-impl-te``, an error without TE), and by default
    whenever Transformer Engine imports on a CUDA machine; megatron.core's local specs otherwise."""
    available = transformer_engine_available()
    if requested and not available:
        raise ConfigError("--transformer-impl-te: Transformer Engine is not installed (pip install '.[gpu]')",
                          field="use_transformer_engine")
    return requested or (available and torch.cuda.is_available())


@dataclass
class MegatronPolicy:
    config: RunConfig
    arch: QwenArch
    layout: Layout
    model: list
    optimizer: Any
    scheduler: Any
    use_transformer_engine: bool
    transformer_config: Any = None
    reference: list | None = None
    """Frozen reference-model chunks for ``ref_logp`` (KL), built by :meth:`load_reference`."""
    reference_offload: ReferenceOffload | None = None
    """``--ref-offload``: moves the reference's weights to the device for each use (:class:`ReferenceOffload`)."""

    @classmethod
    def from_config(cls, config: RunConfig, *, total_steps: int, hf_weights: TensorSource | None = None,
                    use_transformer_engine: bool | None = None, with_reference: bool = False) -> MegatronPolicy:
        """Validate and create the process groups, build this rank's model chunks, load weights
        (``hf_weights``, else ``--hf-checkpoint``, else the preset initialised with the run seed),
        wrap them for training and build the optimizer and LR schedule over ``total_steps``."""
        hf_config = hf_config_of(config)
        arch = arch_from_hf(hf_config)
        layout = init_parallel(config.parallel, arch, seed=config.seed)
        if use_transformer_engine is None:
            use_transformer_engine = resolve_transformer_engine(config.model.use_transformer_engine)
        tf_config = transformer_config(
            arch, config.parallel, dtype=config.model.dtype, moe_aux_loss_coef=config.model.moe_aux_loss_coef,
            use_transformer_engine=use_transformer_engine,
            routing_replay=config.rollout.use_rollout_routing_replay,
            # grouped experts and activation recompute (models/megatron_config.py)
            moe_grouped_gemm=config.model.moe_grouped_gemm,
            recompute_granularity=config.model.recompute_granularity,
            recompute_method=config.model.recompute_method, recompute_num_layers=config.model.recompute_num_layers,
        )
        backend = config.model.attention_backend  # models/attention.py
        chunks = build_model(arch, tf_config, use_transformer_engine, attention_backend=backend)
        # Built now, before the training wrappers attach process groups to the shared config
        # (which megatron's module builders deep-copy); filled by snapshot_reference().
        reference = (build_model(arch, tf_config, use_transformer_engine, attention_backend=backend)
                     if with_reference else None)
        if hf_weights is None:
            hf_weights = (hf_safetensors_source(config.model.hf_checkpoint) if config.model.hf_checkpoint
                          else initial_hf_state_dict(hf_config, config.seed))
        load_hf_weights(chunks, arch, hf_weights, megatron_naming(use_transformer_engine))
        distopt = config.parallel.use_distributed_optimizer
        model = train.wrap_model(chunks, tf_config, use_distributed_optimizer=distopt)
        optimizer, scheduler = train.build_optimizer(model, config.optimizer, total_steps=total_steps,
                                                     use_distributed_optimizer=distopt)
        policy = cls(config, arch, layout, model, optimizer, scheduler, use_transformer_engine, tf_config)
        policy._reference_chunks = reference
        return policy

    def train_step(self, micro_batches: list[MicroBatch], *, num_sequences: int | None = None,
                   num_tokens: int | None = None, loss_config: LossConfig | None = None,
                   measure_mismatch: bool = False) -> dict[str, float]:
        """One optimizer step on this DP rank's micro-batches (see ``parallel.train.train_step``);
        the loss (unless ``loss_config`` overrides it), temperature and routing replay come from
        the run config."""
        if loss_config is None:
            loss_config = self.config.algorithm.loss_config(max_response_len=self.config.rollout.max_response_len)
        return train.train_step(
            self.model, self.optimizer, self.scheduler, micro_batches, loss_config,
            num_sequences=num_sequences, num_tokens=num_tokens, temperature=self.config.rollout.temperature,
            routing_replay=self.config.rollout.use_rollout_routing_replay, measure_mismatch=measure_mismatch,
        )

    def all_reduce_data_parallel(self, stats: MismatchStats) -> MismatchStats:
        """Mismatch statistics of this DP rank's micro-batches combined over the data-parallel group
        (every rank of a replica holds the same micro-batches, so the DP group alone, without CP)."""
        if self.layout.dp == 1:
            return stats
        return all_reduce_mismatch(stats, group=ps.get_data_parallel_group())

    def build_optimizer(self, optim: OptimizerConfig, total_steps: int) -> tuple[Any, Any]:
        """A second (optimizer, LR scheduler) over the same model, e.g. the SFT warm-up's own AdamW."""
        return train.build_optimizer(self.model, optim, total_steps=total_steps,
                                     use_distributed_optimizer=self.config.parallel.use_distributed_optimizer)

    def supervised_step(self, micro_batches: list[MicroBatch], optimizer: Any, *, num_sequences: int,
                        num_tokens: int) -> dict[str, float]:
        """One optimizer step of the token-mean negative log-likelihood of the response tokens, with
        ``optimizer`` (no LR schedule, temperature 1, no routing replay). GRPO's token-mean surrogate
        with Â = 1 and π_old = sg[π_θ] has gradient −(1/N) Σ_t ∇log π(y_t): exactly the NLL's."""
        return train.train_step(self.model, optimizer, None, micro_batches, NLL_LOSS, num_sequences=num_sequences,
                                num_tokens=num_tokens, temperature=1.0)

    def load_reference(self, hf_weights: TensorSource) -> None:
        """Load ``hf_weights`` (full HF tensors, each rank slices its part) into the frozen reference
        model used for ``ref_logp`` (KL): never wrapped in DDP, never optimized. Needs
        ``from_config(..., with_reference=True)``."""
        chunks = getattr(self, "_reference_chunks", None)
        if chunks is None:
            raise RuntimeError("load_reference needs MegatronPolicy.from_config(..., with_reference=True)")
        load_hf_weights(chunks, self.arch, hf_weights, megatron_naming(self.use_transformer_engine))
        for chunk in chunks:
            chunk.requires_grad_(False)
        self.reference = chunks
        offload = self.config.model.ref_offload
        if offload is None:  # --ref-offload unset: on with CUDA; on a CPU it would only copy memory to memory
            offload = torch.cuda.is_available()
        self.reference_offload = ReferenceOffload(chunks) if offload else None

    def compute_reference_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        """Forward-only token-aligned log-probs of the reference model (see :meth:`load_reference`);
        with ``--ref-offload`` its weights are on the device for this call only."""
        if self.reference is None:
            raise RuntimeError("compute_reference_logprobs needs load_reference first")
        offload = self.reference_offload
        if offload is not None:
            offload.load()
        try:
            return train.compute_logprobs(
                self.reference, micro_batches, temperature=self.config.rollout.temperature,
                routing_replay=self.config.rollout.use_rollout_routing_replay,
            )
        finally:
            if offload is not None:
                offload.offload()

    def compute_logprobs(self, micro_batches: list[MicroBatch], *, with_entropy: bool = False):
        """Forward-only token-aligned log-probs (old_logp / ref_logp) on every rank."""
        return train.compute_logprobs(
            self.model, micro_batches, temperature=self.config.rollout.temperature, with_entropy=with_entropy,
            routing_replay=self.config.rollout.use_rollout_routing_replay,
        )

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's OWN share of the current weights as HF (on-disk name, tensor) pairs in the
        model's dtype, streamed (collective: every rank iterates to the end; the union over the
        ranks is the whole model, each tensor once; see ``parallel/export.py``)."""
        from megatron.core.utils import unwrap_model

        chunks = [unwrap_model(m) for m in self.model]
        name_map = hf_name_map(self.arch, megatron_naming(self.use_transformer_engine))
        yield from export_policy_weights(chunks, name_map, dtype=DTYPES[self.config.model.dtype])


class ReferenceOffload:
    """``--ref-offload``: the frozen reference model's weights live in host memory between uses.

    The reference never changes, so its weights are copied to host memory once, here (pinned when CUDA
    is present, for fast asynchronous copies); afterwards nothing is ever copied back to the host.
    :meth:`offload` releases the device memory of every parameter storage (``storage.resize_(0)``,
    the idiom FSDP uses to free a parameter): the parameter objects, their views and the modules stay
    as they are, so every alias survives (the grouped experts' parameters are views of one stacked
    buffer per layer, models/experts.py, which re-pointing ``param.data`` or ``module.to()`` would
    break). :meth:`load` re-allocates each storage and fills it from the host copy: one host-to-device
    copy of this rank's shard of the reference per forward pass, issued on the current stream before
    the forward that reads it. Streaming layer by layer would save more device memory but needs hooks
    in Megatron's schedules; the reference forward runs between training passes, when no training
    activations are alive, so holding its whole shard for that pass is the simple choice.
    Buffers (rotary tables, small) stay on the device.
    """

    def __init__(self, chunks: list[torch.nn.Module]) -> None:
        storages: dict[int, torch.UntypedStorage] = {}
        for chunk in chunks:
            for param in chunk.parameters():
                storage = param.untyped_storage()
                if storage.nbytes():
                    storages.setdefault(storage.data_ptr(), storage)  # tied / stacked parameters share one
        pin = torch.cuda.is_available()
        self._pairs: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        for storage in storages.values():
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(self._bytes(storage))
            self._pairs.append((storage, host))
        self.offload()

    @staticmethod
    def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
        """A uint8 tensor over the whole storage (no copy)."""
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)

    @property
    def on_device(self) -> bool:
        return all(storage.nbytes() == host.numel() for storage, host in self._pairs)

    def offload(self) -> None:
        """Free the device memory of the reference's parameters (their values stay in the host copy)."""
        for storage, _ in self._pairs:
            storage.resize_(0)

    def load(self) -> None:
        """Put the reference's parameters back on the device, bit for bit as they were loaded."""
        for storage, host in self._pairs:
            if storage.nbytes() != host.numel():
                storage.resize_(host.numel())
                self._bytes(storage).copy_(host, non_blocking=host.is_pinned())
