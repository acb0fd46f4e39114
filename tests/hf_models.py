"""Tiny Hugging Face models built in code for parity tests (no hub)."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from luspo_megatron.models import transformers_config


def build_hf_model(config: dict[str, Any], seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 transformers model of ``config`` with every weight random: HF initialises norms
    to 1 and biases to 0, which would hide a swapped norm or a dropped bias."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers_config(config), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "mlp.gate.weight" in name:
                param.normal_(0.0, 0.5)  # router: decisive, well-separated top-k
    return model.eval()
