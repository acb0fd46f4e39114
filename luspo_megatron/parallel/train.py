"""Forward-backward over packed micro-batches with Megatron's schedules, the loss at the last stage.

    model = wrap_model(chunks, config, use_distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(model, run_config.optimizer, ...)
    metrics = train_step(model, optimizer, scheduler, micro_batches, loss_config)
    old_logp = compute_logprobs(model, micro_batches)          # forward only

Loss scaling (docs/design.md §2, "B is global"). Each micro-batch's ``policy_loss`` is already its
exact share of the step loss L (normalised by the GLOBAL sequence count B and token count N), so
the gradient we need is Σ over micro-batches and DP ranks of ∇(share). Megatron, for a loss
function returning (loss, metrics), back-propagates loss · cp / num_microbatches and its DDP
averages gradients over the dp·cp ranks (1/(dp·cp), sum). Returning share · dp · num_microbatches
therefore gives exactly Σ ∇share: the dp·cp cancels, and the CP ranks' partial shares add up to the
micro-batch's share (``ops.seq_logratio`` all-reduces the per-sequence sums over CP, forward and
backward). Megatron's MoE auxiliary loss keeps Megatron's own scaling (its average over DP and
micro-batches), as Megatron adds it.

Micro-batch rules: each DP rank passes its own list; every rank of one DP replica (its TP, PP and
CP ranks) passes the same list. With interleaved pipelining the count must be a multiple of pp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.algorithms.metrics import reduce_metrics
from luspo_megatron.algorithms.mismatch import mismatch_partials, mismatch_stats
from luspo_megatron.config import OptimizerConfig
from luspo_megatron.data.packing import MicroBatch
from luspo_megatron.errors import ConfigError
from luspo_megatron.parallel.logprobs import vocab_parallel_logprobs
from luspo_megatron.parallel.microbatch import LocalMicroBatch, shard_micro_batch, unshard_logprobs

# Metrics that every CP rank reports identically (they come from CP-global per-sequence sums).
_CP_DUPLICATED_COUNTS = ("num_seqs", "num_empty_seqs")


# ---------------------------------------------------------------------------------------- wrapping
def wrap_model(chunks: list[torch.nn.Module], config: TransformerConfig, *,
               use_distributed_optimizer: bool = False) -> list[DistributedDataParallel]:
    """Megatron's training wrappers: Float16Module for bf16 params, then DDP per chunk; also
    installs the grad-sync hooks Megatron's schedules call (no_sync, finalize_model_grads)."""
    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(model: list[DistributedDataParallel], optim: OptimizerConfig, *, total_steps: int,
                    use_distributed_optimizer: bool = False) -> tuple:
    """AdamW from ``megatron.core.optimizer`` (distributed or not) and Megatron's LR schedule:
    linear warm-up from 0 over ``lr_warmup_iters`` steps, then constant or cosine down to
    ``min_lr`` at ``total_steps``. Megatron's convention: step s uses lr·s/warmup (the first step
    has lr 0 when warming up). Weight decay skips biases and norms (Megatron's default)."""
    config = unwrap_model(model[0]).config
    opt_config = MegatronOptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    warmup = optim.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# ------------------------------------------------------------------------------------ step context
@dataclass
class _StepContext:
    loss_config: LossConfig | None
    num_sequences: int
    num_tokens: float
    scale: float
    temperature: float
    chunk_size: int | None
    with_entropy: bool
    routing_replay: bool
    tp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    measure_mismatch: bool = False  # emit mismatch partials of (sg[logp], rollout_logp): the policy IS π_old


def _moe_routers(chunk: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(global MoE-layer index, router) of the MoE layers in a chunk, in model order."""
    gpt = unwrap_model(chunk)
    pattern = gpt.config.moe_layer_freq
    if gpt.config.num_moe_experts is None:
        return []
    pattern = pattern if isinstance(pattern, list) else [int(i % pattern == 0) for i in range(gpt.config.num_layers)]
    moe_index = [sum(pattern[:i]) for i in range(len(pattern))]
    out = []
    for layer in gpt.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            out.append((moe_index[layer.layer_number - 1], router))
    return out


def _set_replay(chunk: torch.nn.Module, routed: torch.Tensor | None) -> None:
    for moe_layer, router in _moe_routers(chunk):
        if router.router_replay is None:
            raise ConfigError("--use-rollout-routing-replay: the model was built without routing replay "
                              "(transformer_config(..., routing_replay=True))", field="use_rollout_routing_replay")
        router.router_replay.clear_indices()
        router.router_replay.set_target_indices(routed[moe_layer])
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def _clear_replay(model: list[torch.nn.Module]) -> None:
    for chunk in model:
        for _, router in _moe_routers(chunk):
            if router.router_replay is not None:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()


def _forward_step(ctx: _StepContext, data_iterator, model):
    mb: LocalMicroBatch = next(data_iterator)
    if ctx.routing_replay:
        if mb.routed_experts is None:
            raise ConfigError("--use-rollout-routing-replay: a micro-batch has no routed_experts",
                              field="use_rollout_routing_replay")
        _set_replay(model, mb.routed_experts)
    # Call the GPTModel under the wrappers: Float16Module would cast the [t, V/tp] logits to fp32
    # (a full copy); the log-prob op reads them in chunks in their own dtype instead.
    output = unwrap_model(model)(mb.input_ids, None, None, packed_seq_params=mb.packed_seq_params)
    return output, partial(_loss if ctx.loss_config is not None else _logprobs_only, ctx, mb)


def _logprobs(ctx: _StepContext, mb: LocalMicroBatch, output: torch.Tensor, inplace: bool):
    return vocab_parallel_logprobs(
        output[0], mb.labels, tp_group=ctx.tp_group, temperature=ctx.temperature,
        with_entropy=ctx.with_entropy, chunk_size=ctx.chunk_size, inplace_backward=inplace,
    )


def _loss(ctx: _StepContext, mb: LocalMicroBatch, output: torch.Tensor):
    lp = _logprobs(ctx, mb, output, inplace=True)
    # No old_logp means on-policy: the policy that sampled is the one being trained (one optimizer
    # step per rollout), so π_old = sg[π_θ] exactly and the recompute forward pass is skipped.
    old_logp = mb.old_logp if mb.old_logp is not None else lp.logp.detach()
    loss, metrics = policy_loss(
        lp.logp, old_logp, mb.advantages, mb.loss_mask, mb.cu_seqlens, ctx.loss_config,
        num_sequences=ctx.num_sequences, num_tokens=ctx.num_tokens, rollout_logp=mb.rollout_logp,
        ref_logp=mb.ref_logp, entropy=lp.entropy, cp_group=ctx.cp_group,
    )
    if ctx.measure_mismatch and mb.rollout_logp is not None:  # train–inference mismatch, summed / maxed later
        metrics.update(mismatch_partials(mismatch_stats(lp.logp.detach(), mb.rollout_logp, mb.loss_mask,
                                                        mb.cu_seqlens, cp_group=ctx.cp_group)))
    return loss * ctx.scale, metrics


def _logprobs_only(ctx: _StepContext, mb: LocalMicroBatch, output: torch.Tensor):
    lp = _logprobs(ctx, mb, output, inplace=False)
    return output.new_zeros(()), {"logp": lp.logp.detach(), "entropy": lp.entropy}


def _run_schedule(model, local: list[LocalMicroBatch], ctx: _StepContext, forward_only: bool):
    chunks = len(model)
    data = [iter(local) for _ in range(chunks)] if chunks > 1 else iter(local)
    if chunks > 1 and len(local) % ps.get_pipeline_model_parallel_world_size():
        raise ConfigError(f"--virtual-pipeline-model-parallel-size: interleaved pipelining needs the number of "
                          f"micro-batches per DP rank to be a multiple of pp, got {len(local)}",
                          field="virtual_pipeline_model_parallel_size")
    try:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, ctx), data_iterator=data, model=model,
            num_microbatches=len(local), seq_length=max(m.input_ids.shape[1] for m in local),
            micro_batch_size=1, forward_only=forward_only,
        )
    finally:
        if ctx.routing_replay:
            _clear_replay(model)


def _groups():
    tp = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    cp = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return tp, cp


def _shard_all(model, micro_batches: list[MicroBatch]) -> list[LocalMicroBatch]:
    config = unwrap_model(model[0]).config
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    _, cp_group = _groups()
    for i, mb in enumerate(micro_batches):
        mb.validate(i)
    return [
        shard_micro_batch(
            mb, cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            sequence_parallel=config.sequence_parallel, cp_group=cp_group, device=device,
        )
        for mb in micro_batches
    ]


def global_counts(micro_batches: list[MicroBatch]) -> tuple[int, int]:
    """(B, N): sequences and response tokens over every micro-batch of every DP rank."""
    local = torch.tensor([
        sum(mb.num_sequences for mb in micro_batches),
        sum(int(mb.loss_mask.sum()) for mb in micro_batches if mb.loss_mask is not None),
    ], dtype=torch.float64)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return int(local[0]), int(local[1])


# -------------------------------------------------------------------------------------- train step
def train_step(
    model: list[DistributedDataParallel],
    optimizer,
    scheduler: OptimizerParamScheduler | None,
    micro_batches: list[MicroBatch],
    loss_config: LossConfig,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    temperature: float = 1.0,
    routing_replay: bool = False,
    logprob_chunk_size: int | None = None,
    measure_mismatch: bool = False,
) -> dict[str, float]:
    """One optimizer step over this DP rank's micro-batches; the same metrics on every rank.

    ``num_sequences`` / ``num_tokens``: the GLOBAL B and response-token count of the step (all
    micro-batches of all DP ranks); computed with one all-reduce when None. Returns the
    ``policy_loss`` metrics combined with ``reduce_metrics`` over micro-batches and ranks, plus
    ``grad_norm`` (before clipping), ``lr``, ``skipped`` (1 when the gradient was not finite and
    the update was skipped) and ``moe_aux_loss`` (Megatron's load-balancing loss, per MoE layer).
    ``measure_mismatch``: the current policy is π_old (nothing updated since the rollout), so the loss
    also emits ``algorithms.mismatch.mismatch_partials`` of (sg[logp], rollout_logp), reduced over
    micro-batches and ranks like the other metrics (``finalize_mismatch_partials`` reads them)."""
    if num_sequences is None or num_tokens is None:
        counted = global_counts(micro_batches)
        num_sequences = counted[0] if num_sequences is None else num_sequences
        num_tokens = counted[1] if num_tokens is None else num_tokens
    local = _shard_all(model, micro_batches)
    tp_group, cp_group = _groups()
    ctx = _StepContext(
        loss_config=loss_config, num_sequences=num_sequences, num_tokens=float(num_tokens),
        scale=float(ps.get_data_parallel_world_size() * len(local)), temperature=temperature,
        chunk_size=logprob_chunk_size, with_entropy=True, routing_replay=routing_replay,
        tp_group=tp_group, cp_group=cp_group, measure_mismatch=measure_mismatch,
    )
    for chunk in model:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    moe_utils.clear_aux_losses_tracker()
    parts = _run_schedule(model, local, ctx, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on below)
    grad_norm, skipped = _optimizer_step(optimizer)
    if scheduler is not None and not skipped:
        scheduler.step(increment=1)
    metrics = _gather_metrics(parts, loss_config)
    metrics.update(grad_norm=grad_norm, skipped=float(skipped), lr=lr)
    aux = _moe_aux_loss(model, len(local))
    if aux is not None:
        metrics["moe_aux_loss"] = aux
    return metrics


@torch.no_grad()
def _optimizer_step(optimizer) -> tuple[float, bool]:
    """ChainedOptimizer.step with a finiteness check first: the global grad norm is computed once;
    a NaN/inf gradient skips the update (the caller counts it) instead of corrupting the weights."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return grad_norm, True
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
    optimizer.step_with_ready_grads()
    return grad_norm, False


def _gather_metrics(parts: list[dict], loss_config: LossConfig | None) -> dict[str, float]:
    """reduce_metrics over micro-batches, then over the DP×CP ranks of the last stage; then every
    pipeline rank receives them from its last stage."""
    result: list = [None]
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        local = reduce_metrics(parts)
        group = ps.get_data_parallel_group(with_context_parallel=True)
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        merged = reduce_metrics(gathered)
        cp = ps.get_context_parallel_world_size()
        if cp > 1:  # every CP rank reported the same sequence counts
            dup = _CP_DUPLICATED_COUNTS + (("num_clipped",) if loss_config and loss_config.sequence_level else ())
            for key in dup:
                if key in merged:
                    merged[key] /= cp
        result = [merged]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(result, src=last, group=ps.get_pipeline_model_parallel_group())
    return result[0]


def _moe_aux_loss(model, num_microbatches: int) -> float | None:
    """Megatron's load-balancing loss of the step, averaged over MoE layers and micro-batches."""
    config = unwrap_model(model[0]).config
    if not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return None
    name = "load_balancing_loss"
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if name not in tracker:  # a stage without MoE layers still joins the reductions below
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        tracker[name] = {"values": torch.zeros(config.num_layers, device=device), "avg_group": None,
                         "reduce_group_has_dp": False, "reduce_group": ps.get_tensor_and_context_parallel_group()}
    moe_utils.reduce_aux_losses_tracker_across_ranks([name])
    num_moe = sum(config.moe_layer_freq) if isinstance(config.moe_layer_freq, list) else config.num_layers
    value = float(tracker[name]["values"].sum()) / max(num_moe, 1) / num_microbatches
    moe_utils.clear_aux_losses_tracker()
    return value


# ---------------------------------------------------------------------------------- forward only
@torch.no_grad()
def compute_logprobs(
    model: list[DistributedDataParallel],
    micro_batches: list[MicroBatch],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    routing_replay: bool = False,
    logprob_chunk_size: int | None = None,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward only: the token-aligned log p(tokens[t] | tokens[<t]) at temperature τ of every
    micro-batch ([T] float32, 0 at each sequence's first token), on EVERY rank (broadcast from
    the last pipeline stage). With ``with_entropy``, also the per-token entropies (same layout:
    entry t is the entropy of the distribution that produced tokens[t])."""
    local = _shard_all(model, micro_batches)
    tp_group, cp_group = _groups()
    ctx = _StepContext(
        loss_config=None, num_sequences=1, num_tokens=1.0, scale=1.0, temperature=temperature,
        chunk_size=logprob_chunk_size, with_entropy=with_entropy, routing_replay=routing_replay,
        tp_group=tp_group, cp_group=cp_group,
    )
    for chunk in model:
        chunk.eval()
    try:
        parts = _run_schedule(model, local, ctx, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    keys = ("logp", "entropy") if with_entropy else ("logp",)
    outputs = {key: [] for key in keys}
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    for i, (mb, lmb) in enumerate(zip(micro_batches, local)):
        for key in keys:
            if last:
                value = unshard_logprobs(parts[i][key].float(), lmb, cp_group)
            else:
                value = torch.empty(mb.tokens.numel(), dtype=torch.float32, device=device)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
            outputs[key].append(value.cpu())
    return (outputs["logp"], outputs["entropy"]) if with_entropy else outputs["logp"]
