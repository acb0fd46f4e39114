"""QwenArch + parallel layout -> megatron.core ``TransformerConfig``.

The mapping, field by field (HF name -> Megatron name):

    hidden_size -> hidden_size               num_hidden_layers -> num_layers
    num_attention_heads -> num_attention_heads
    num_key_value_heads -> num_query_groups (GQA)
    head_dim -> kv_channels                  (Qwen3's explicit 128; Qwen2.5: hidden/heads)
    intermediate_size -> ffn_hidden_size     (dense layers; SwiGLU: gated_linear_unit + silu)
    rms_norm_eps -> layernorm_epsilon        (normalization "RMSNorm")
    Qwen3 q_norm/k_norm -> qk_layernorm      Qwen2.5 q/k/v bias -> add_qkv_bias (add_bias_linear off)
    rope_theta -> GPTModel(rotary_base=)     tie_word_embeddings -> GPTModel(share_embeddings_...)
    num_experts -> num_moe_experts           num_experts_per_tok -> moe_router_topk
    moe_intermediate_size -> moe_ffn_hidden_size
    decoder_sparse_step, mlp_only_layers -> moe_layer_freq (an explicit 0/1 list per layer)
    router_aux_loss_coef -> moe_aux_loss_coeff ("aux_loss" balancing; per layer, as Megatron adds it)
    norm_topk_prob -> moe_router_pre_softmax = not norm_topk_prob:
        True : HF softmax over all experts, top-k, renormalise  ==  Megatron top-k on the logits,
               softmax over the k selected (pre_softmax False): exp(l_i) / Σ_{j∈topk} exp(l_j).
        False: HF top-k of the full softmax, not renormalised  ==  Megatron pre_softmax True.
    router in float32 -> moe_router_dtype "fp32"

Sequence parallelism: forced on whenever tp > 1 and the model has MoE layers (Megatron refuses
MoE + TP without it in training), and off at tp = 1 where Megatron forbids it.

Experts (``--moe-grouped-gemm``, ``moe_grouped_gemm``): with Transformer Engine always TE's grouped
GEMM; on the local spec ``models/experts.GroupedExperts`` when true, megatron's SequentialMLP when
false; None (auto) = true on a CUDA machine, false on a CPU (megatron's flag, which ``models/build``
reads to pick the experts module).

Activation recompute (megatron's flags, megatron's meaning; the combinations megatron-core 0.16.1
accepts, refused here with one line naming the flag):

    --recompute-granularity selective     recompute core attention (megatron's default
                                          ``recompute_modules``) in every layer; no method, no count
    --recompute-granularity full          recompute whole layers, with
        --recompute-method uniform        ... in chunks of --recompute-num-layers N layers (all layers;
                                          N divides the layers of a pipeline stage / virtual stage)
        --recompute-method block          ... only the first N layers of each pipeline (virtual) stage
        --recompute-num-layers N          1 ≤ N ≤ layers per pipeline stage (per virtual stage)
    (no granularity)                      no recompute; method and count must be unset

Full recompute re-runs the router in backward; with routing replay (R3) that replays the right
micro-batch only without pipelining (the replay target is the latest forward's), so full recompute
with replay needs pp = 1.

CPU (no CUDA): ``use_cpu_initialization`` and ``batch_p2p_comm=False`` (batched p2p on gloo gives
silently wrong gradients with interleaved pipelining, reference §5a). Every fusion flag is set
explicitly off: they default off in 0.16.1, but other versions or bridges may turn them on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from luspo_megatron.config import ParallelConfig
from luspo_megatron.errors import ConfigError
from luspo_megatron.models.arch import QwenArch

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def grouped_experts_enabled(requested: bool | None, use_transformer_engine: bool, cuda: bool) -> bool:
    """The effective ``--moe-grouped-gemm`` (module docstring)."""
    if use_transformer_engine:
        if requested is False:
            raise ConfigError("--moe-grouped-gemm: expected true or unset with Transformer Engine (its experts are "
                              "always the grouped GEMM), got false", field="moe_grouped_gemm")
        return True
    return cuda if requested is None else bool(requested)


def recompute_options(granularity: str | None, method: str | None, num_layers: int | None, *,
                      layers_per_chunk: int, routing_replay: bool = False, pipeline: int = 1) -> dict[str, Any]:
    """The ``TransformerConfig`` recompute fields, after the checks of the module docstring."""
    def refuse(flag: str, rule: str, value: Any) -> ConfigError:
        return ConfigError(f"{flag}: expected {rule}, got {value!r}", field=flag[2:].replace("-", "_"))

    if granularity is None:
        if method is not None:
            raise refuse("--recompute-method", "unset without --recompute-granularity full", method)
        if num_layers is not None:
            raise refuse("--recompute-num-layers", "unset without --recompute-granularity full", num_layers)
        return {}
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise refuse("--recompute-granularity", f"one of {RECOMPUTE_GRANULARITIES}", granularity)
    if granularity == "selective":
        if method is not None:
            raise refuse("--recompute-method", "unset with --recompute-granularity selective (it recomputes core "
                         "attention in every layer)", method)
        if num_layers is not None:
            raise refuse("--recompute-num-layers", "unset with --recompute-granularity selective", num_layers)
        return {"recompute_granularity": "selective"}
    if method not in RECOMPUTE_METHODS:
        raise refuse("--recompute-method", f"one of {RECOMPUTE_METHODS} with --recompute-granularity full", method)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= layers_per_chunk:
        raise refuse("--recompute-num-layers", f"an integer in [1, {layers_per_chunk}] (layers per pipeline stage "
                     "and virtual stage) with --recompute-granularity full", num_layers)
    if method == "uniform" and layers_per_chunk % num_layers:
        # megatron's uniform loop checkpoints layers [i, i + N) and indexes past the last layer otherwise
        raise refuse("--recompute-num-layers", f"a divisor of the {layers_per_chunk} layers per pipeline stage "
                     "and virtual stage with --recompute-method uniform", num_layers)
    if routing_replay and pipeline > 1:
        raise refuse("--recompute-granularity", "selective or unset with --use-rollout-routing-replay and "
                     f"--pipeline-model-parallel-size {pipeline} (the replayed routing would be another "
                     "micro-batch's)", granularity)
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def sequence_parallel_enabled(arch: QwenArch, parallel: ParallelConfig) -> bool:
    """The effective ``--sequence-parallel``: forced on for MoE with tp > 1, off at tp = 1."""
    if parallel.tensor_model_parallel_size == 1:
        return False
    return parallel.sequence_parallel or arch.is_moe


def transformer_config(
    arch: QwenArch,
    parallel: ParallelConfig | None = None,
    *,
    dtype: str = "fp32",
    moe_aux_loss_coef: float | None = None,
    use_transformer_engine: bool = False,
    routing_replay: bool = False,
    cuda: bool | None = None,
    moe_grouped_gemm: bool | None = None,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of ``arch`` under ``parallel`` (default: one process).
    ``moe_grouped_gemm`` and ``recompute_*``: the flags of the module docstring."""
    parallel = parallel or ParallelConfig()
    if dtype not in DTYPES:
        raise ConfigError(f"--model-dtype: expected one of {tuple(DTYPES)}, got {dtype!r}", field="dtype")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    params_dtype = DTYPES[dtype]
    seq_parallel = sequence_parallel_enabled(arch, parallel)
    recompute = recompute_options(
        recompute_granularity, recompute_method, recompute_num_layers,
        layers_per_chunk=max(1, arch.num_layers // (parallel.pipeline_model_parallel_size
                                                   * (parallel.virtual_pipeline_model_parallel_size or 1))),
        routing_replay=routing_replay, pipeline=parallel.pipeline_model_parallel_size,
    )
    if seq_parallel and not parallel.sequence_parallel:
        logger.info("sequence parallelism forced on: MoE layers with tp=%d", parallel.tensor_model_parallel_size)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=arch.init_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=dtype == "bf16",
        use_cpu_initialization=not cuda,
        **parallel.megatron_sizes(),
        sequence_parallel=seq_parallel,
        # Packed micro-batches differ in length: pipeline p2p must send shapes first.
        variable_seq_lengths=True,
        batch_p2p_comm=cuda,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # TransformerConfig rejects the default "allgather" with variable_seq_lengths even for
        # dense models; "alltoall" is also what the MoE layers use.
        moe_token_dispatcher_type="alltoall",
        **recompute,
    )
    if arch.is_moe:
        coef = arch.router_aux_loss_coef if moe_aux_loss_coef is None else moe_aux_loss_coef
        if arch.moe_router_topk == 1 and arch.norm_topk_prob:
            # Megatron needs pre-softmax routing at k=1 (a softmax over one logit has no gradient),
            # which is the un-renormalised HF router, not norm_topk_prob's weight of exactly 1.
            raise ConfigError("norm_topk_prob: top-1 routing with norm_topk_prob=true is not supported",
                              field="norm_topk_prob")
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_router_topk,
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if coef > 0 else "none",
            moe_aux_loss_coeff=coef,
            moe_layer_freq=[int(m) for m in arch.moe_layers],
            moe_router_dtype="fp32",
            moe_grouped_gemm=grouped_experts_enabled(moe_grouped_gemm, use_transformer_engine, cuda),
            moe_permute_fusion=False,
            moe_router_fusion=False,
            moe_enable_routing_replay=routing_replay,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
