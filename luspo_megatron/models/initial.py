"""A model's starting point: its Hugging Face config, and weights freshly initialised by transformers.

Megatron's own initialiser draws differently in every PP/EP layout; a preset model is therefore
initialised once in transformers under the run seed and loaded like any HF checkpoint, so its
weights do not depend on the layout and the rollout engine can start from the identical model.
"""

from __future__ import annotations

from typing import Any

import torch

from luspo_megatron.config import RunConfig
from luspo_megatron.models.arch import PRESETS, load_hf_config, transformers_config
from luspo_megatron.models.hf_map import hf_live_to_disk


def hf_config_of(config: RunConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of the run's model: the checkpoint's, or the preset's."""
    if config.model.hf_checkpoint:
        return load_hf_config(config.model.hf_checkpoint)
    return PRESETS[config.model.preset]()


def initial_hf_state_dict(hf_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A preset's starting weights: its transformers model initialised under ``seed``, in
    on-disk names. Every rank computes the same tensors (no communication)."""
    import transformers

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(hf_config), dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return hf_live_to_disk(model.state_dict(), bool(hf_config.get("tie_word_embeddings", False)))
