"""Qwen3-MoE / Qwen3 / Qwen2.5 as megatron.core models (docs/design.md §3, ``models/``).

    arch = arch_from_hf(load_hf_config(path))            # or arch_from_hf(tiny_qwen3_moe())
    config = transformer_config(arch, run_config.parallel, dtype="bf16")
    chunks = build_model(arch, config)                   # this rank's PP stage / VPP chunks
    load_hf_weights(chunks, arch, hf_safetensors_source(path))

``arch``, ``presets`` and ``transformers_config`` do not import megatron; the rest does.
"""

from luspo_megatron.models.arch import (
    PRESETS,
    QWEN3_VOCAB_SIZE,
    QwenArch,
    arch_from_hf,
    load_hf_config,
    tiny_qwen3,
    tiny_qwen3_moe,
    tiny_qwen25,
    transformers_config,
)

__all__ = [
    "PRESETS",
    "QWEN3_VOCAB_SIZE",
    "QwenArch",
    "arch_from_hf",
    "load_hf_config",
    "tiny_qwen3",
    "tiny_qwen3_moe",
    "tiny_qwen25",
    "transformers_config",
]
