"""Layer specs and model chunks: megatron.core's own GPT specs and ``GPTModel``, nothing forked.

Spec choice: Transformer Engine specs when ``transformer_engine`` imports (GPU, the ``[gpu]``
extra), else megatron.core's local spec with torch RMSNorm. Both are the same math; the local spec
swaps two submodules, nothing else:

- ``core_attention`` -> :class:`~luspo_megatron.models.attention.PackedDotProductAttention` (the
  local ``DotProductAttention`` refuses packed sequences and context parallel), with the
  ``--attention-backend`` as a spec param;
- with ``config.moe_grouped_gemm`` (``--moe-grouped-gemm``), the MoE layer's experts ->
  :class:`~luspo_megatron.models.experts.GroupedExperts` (megatron's local spec would pick the legacy
  ``GroupedMLP``, which needs the ``grouped_gemm`` package); without it, megatron's SequentialMLP.
  Both have the same parameters and names.

Parameter names differ between the TE and the local spec (see ``models.hf_map``): with TE the input norm is
fused into ``linear_qkv`` (``layer_norm_weight``), the dense pre-MLP norm into ``linear_fc1``, and
grouped experts are ``mlp.experts.linear_fc{1,2}.weight{e}``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import warnings

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from luspo_megatron.models.arch import QwenArch
from luspo_megatron.models.attention import PackedDotProductAttention, check_backend
from luspo_megatron.models.experts import GroupedExperts

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be imported (the TE specs need it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _local_layer(layer: ModuleSpec, attention_backend: str, grouped_experts: bool) -> ModuleSpec:
    """One local-spec layer with our core attention and, for MoE layers, our grouped experts."""
    attention = layer.submodules.self_attention
    core = ModuleSpec(module=PackedDotProductAttention, params={"backend": attention_backend})
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                               core_attention=core))
    changes = {"self_attention": attention}
    mlp = layer.submodules.mlp
    if grouped_experts and isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        experts = ModuleSpec(module=GroupedExperts,
                             submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
        changes["mlp"] = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, experts=experts))
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **changes))


def decoder_block_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None = None,
    attention_backend: str = "auto",
) -> TransformerBlockSubmodules:
    """The decoder block spec of this rank's pipeline stage (and virtual stage ``vp_stage``):
    megatron's ``get_gpt_decoder_block_spec``, which reads the per-layer MoE pattern from
    ``config.moe_layer_freq``."""
    with warnings.catch_warnings():
        # the local spec names the legacy GroupedMLP for moe_grouped_gemm (and warns); we replace it
        warnings.filterwarnings("ignore", message="The legacy GroupedMLP will be deprecated")
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_transformer_engine, normalization="RMSNorm", vp_stage=vp_stage
        )
    if not use_transformer_engine:
        layers = [_local_layer(s, attention_backend, bool(config.moe_grouped_gemm)) for s in spec.layer_specs]
        spec = dataclasses.replace(spec, layer_specs=layers)
    return spec


def build_model(
    arch: QwenArch, config: TransformerConfig, use_transformer_engine: bool | None = None,
    attention_backend: str = "auto",
) -> list[GPTModel]:
    """The ``GPTModel`` chunks of this rank: one per virtual pipeline stage (one without VPP).
    ``attention_backend``: ``--attention-backend`` of the local spec (``models/attention.py``); the
    experts follow ``config.moe_grouped_gemm``.

    Needs ``parallel_state`` initialised. Weights are Megatron's initialisation; load real ones
    with :func:`luspo_megatron.models.load_hf_weights`."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if not use_transformer_engine:
        check_backend(attention_backend, config)
    experts = "none (dense)"
    if arch.is_moe:
        experts = ("Transformer Engine grouped GEMM" if use_transformer_engine
                   else "grouped (torch grouped_mm)" if config.moe_grouped_gemm else "sequential (SequentialMLP)")
    logger.info("building %s: %s spec, attention backend %s, experts %s", arch.family,
                "Transformer Engine" if use_transformer_engine else "local",
                "TE" if use_transformer_engine else attention_backend, experts)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if arch.vocab_size % tp:
        raise ValueError(f"vocab_size {arch.vocab_size} is not divisible by tp={tp}")
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, use_transformer_engine, vp_stage=stage,
                                                      attention_backend=attention_backend),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
            vp_stage=stage,
        )
        for param in model.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if not config.use_cpu_initialization and torch.cuda.is_available():
            # Megatron's parallel linears allocate on the current GPU, but norms, routers and the local
            # experts are plain modules created on the CPU: move the whole chunk, as Megatron-LM's get_model.
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
