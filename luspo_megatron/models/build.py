"""Layer specs and model chunks: megatron.core's own GPT specs and ``GPTModel``, nothing forked.

Spec choice: Transformer Engine specs when ``transformer_engine`` imports (GPU, the ``[gpu]``
extra), else megatron.core's local spec with torch RMSNorm and SequentialMLP experts. Both are the
same math; the local spec only swaps its ``core_attention`` for
:class:`~luspo_megatron.models.attention.PackedDotProductAttention`, because the local
``DotProductAttention`` refuses packed sequences and context parallel.

Parameter names differ between the two (see ``models.hf_map``): with TE the input norm is
fused into ``linear_qkv`` (``layer_norm_weight``), the dense pre-MLP norm into ``linear_fc1``, and
grouped experts are ``mlp.experts.linear_fc{1,2}.weight{e}``.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from luspo_megatron.models.arch import QwenArch
from luspo_megatron.models.attention import PackedDotProductAttention


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be imported (the TE specs need it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _with_packed_attention(layer: ModuleSpec) -> ModuleSpec:
    attention = layer.submodules.self_attention
    attn_sub = dataclasses.replace(attention.submodules, core_attention=PackedDotProductAttention)
    attention = dataclasses.replace(attention, submodules=attn_sub)
    layer_sub = dataclasses.replace(layer.submodules, self_attention=attention)
    return dataclasses.replace(layer, submodules=layer_sub)


def decoder_block_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The decoder block spec of this rank's pipeline stage (and virtual stage ``vp_stage``):
    megatron's ``get_gpt_decoder_block_spec``, which reads the per-layer MoE pattern from
    ``config.moe_layer_freq``."""
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine, normalization="RMSNorm", vp_stage=vp_stage
    )
    if not use_transformer_engine:
        spec = dataclasses.replace(spec, layer_specs=[_with_packed_attention(s) for s in spec.layer_specs])
    return spec


def build_model(
    arch: QwenArch, config: TransformerConfig, use_transformer_engine: bool | None = None
) -> list[GPTModel]:
    """The ``GPTModel`` chunks of this rank: one per virtual pipeline stage (one without VPP).

    Needs ``parallel_state`` initialised. Weights are Megatron's initialisation; load real ones
    with :func:`luspo_megatron.models.load_hf_weights`."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if arch.vocab_size % tp:
        raise ValueError(f"vocab_size {arch.vocab_size} is not divisible by tp={tp}")
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, use_transformer_engine, vp_stage=stage),
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
