"""The architecture of a Qwen-family checkpoint, read from its Hugging Face ``config.json``.

One frozen :class:`QwenArch` carries everything the Megatron side needs, whatever spelling the
config used: Qwen3-MoE (``qwen3_moe``), Qwen3 dense (``qwen3``) and Qwen2.5 (``qwen2``). The
differences that matter, each read explicitly:

- Qwen3 has an explicit ``head_dim`` (128 in the released models, not hidden/heads); Qwen2.5 derives it.
- GQA: ``num_key_value_heads`` query groups.
- QK RMSNorm (per head, before RoPE) on Qwen3 and Qwen3-MoE only; QKV bias on Qwen2.5 only
  (q/k/v have a bias, o_proj and the MLP none).
- RoPE base: top-level ``rope_theta`` (official configs) or ``rope_parameters.rope_theta``
  (written by transformers 5); HF's default 10000 when neither is present.
- Experts: ``num_experts`` (official) or ``num_local_experts`` (transformers 5's attribute map).
- Per-layer MoE pattern: layer i is MoE iff i ∉ mlp_only_layers and (i+1) % decoder_sparse_step == 0,
  exactly as ``Qwen3MoeDecoderLayer`` decides; dense layers use ``intermediate_size``, experts
  ``moe_intermediate_size``.
- ``norm_topk_prob``: whether the top-k routing weights are renormalised to sum to 1.

The ``tiny_*`` presets build HF ``config.json`` dicts in code (no hub), so that the same dict can
build the transformers model of a test or the rollout server and the Megatron policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luspo_megatron.errors import ConfigError

FAMILIES = ("qwen3_moe", "qwen3", "qwen2")
QWEN3_VOCAB_SIZE = 151936  # the real Qwen3 / Qwen2.5 embedding rows (tokenizer has 151669 ids)
HF_DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


@dataclass(frozen=True)
class QwenArch:
    """A Qwen-family transformer, independent of how its config was spelled."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int  # dense layers
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    init_std: float = 0.02
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense (False); () for dense models

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None and any(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    return default


def _require(config: Mapping[str, Any], name: str, where: str) -> Any:
    value = config.get(name)
    if value is None:
        raise ConfigError(f"{where}: expected key {name!r} in the Hugging Face config", field=name)
    return value


def rope_theta_of(config: Mapping[str, Any]) -> float:
    """RoPE base from ``rope_theta`` or ``rope_parameters`` / ``rope_scaling``; only plain RoPE
    (rope_type "default") is supported: YaRN / dynamic scaling would change the positions."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"{name}.rope_type: expected 'default' (plain RoPE), got {kind!r}", field=name)
    theta = config.get("rope_theta", params.get("rope_theta"))
    return float(theta) if theta is not None else HF_DEFAULT_ROPE_THETA


def moe_layer_pattern(config: Mapping[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Which layers are sparse, by transformers' Qwen3MoeDecoderLayer rule."""
    mlp_only = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or 1)
    if step < 1:
        raise ConfigError(f"decoder_sparse_step: expected ≥ 1, got {step}", field="decoder_sparse_step")
    bad = sorted(i for i in mlp_only if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"mlp_only_layers: expected layer indices in [0, {num_layers}), got {bad}",
                          field="mlp_only_layers")
    return tuple((i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def arch_from_hf(config: Mapping[str, Any] | Any) -> QwenArch:
    """Read a HF config (a ``config.json`` dict or a transformers ``PretrainedConfig``)."""
    if not isinstance(config, Mapping):
        config = config.to_dict()
    where = "config.json"
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"model_type: expected one of {FAMILIES}, got {family!r}", field="model_type")
    if config.get("use_sliding_window"):
        raise ConfigError("use_sliding_window: expected false (sliding-window attention is not supported)",
                          field="use_sliding_window")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act: expected 'silu' (SwiGLU), got {act!r}", field="hidden_act")
    hidden = int(_require(config, "hidden_size", where))
    heads = int(_require(config, "num_attention_heads", where))
    groups = int(_get(config, "num_key_value_heads", default=heads))
    if heads % groups:
        raise ConfigError(f"num_key_value_heads: expected a divisor of num_attention_heads={heads}, got {groups}",
                          field="num_key_value_heads")
    num_layers = int(_require(config, "num_hidden_layers", where))
    qwen3 = family in ("qwen3", "qwen3_moe")
    if qwen3 and config.get("attention_bias"):
        raise ConfigError("attention_bias: expected false for Qwen3 (o_proj bias is not mapped)",
                          field="attention_bias")
    num_experts = None
    moe_layers: tuple[bool, ...] = ()
    if family == "qwen3_moe":
        num_experts = int(_get(config, "num_experts", "num_local_experts", default=0))
        moe_layers = moe_layer_pattern(config, num_layers, num_experts)
        if not any(moe_layers):
            num_experts, moe_layers = None, ()
    return QwenArch(
        family=family,
        vocab_size=int(_require(config, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(_get(config, "head_dim", default=hidden // heads)),
        ffn_hidden_size=int(_require(config, "intermediate_size", where)),
        rms_norm_eps=float(_get(config, "rms_norm_eps", default=1e-6)),
        rope_theta=rope_theta_of(config),
        max_position_embeddings=int(_get(config, "max_position_embeddings", default=32768)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=qwen3,
        qkv_bias=family == "qwen2",
        init_std=float(_get(config, "initializer_range", default=0.02)),
        num_experts=num_experts,
        moe_ffn_hidden_size=int(_require(config, "moe_intermediate_size", where)) if num_experts else None,
        moe_router_topk=int(_require(config, "num_experts_per_tok", where)) if num_experts else None,
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(_get(config, "router_aux_loss_coef", default=0.0)),
        moe_layers=moe_layers,
    )


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a HF model directory (or the file itself) as a dict."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--hf-checkpoint: no config.json at {str(file)!r}", field="hf_checkpoint")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--hf-checkpoint: {file} is not valid JSON (line {err.lineno})",
                          field="hf_checkpoint") from None


# ------------------------------------------------------------------------------------------ presets
def _tokens(vocab_size: int) -> dict[str, Any]:
    """Qwen3's special ids (<|im_end|> eos, <|endoftext|> pad) when they fit the vocabulary;
    none for a reduced test vocabulary."""
    if vocab_size > 151645:
        return {"bos_token_id": None, "eos_token_id": 151645, "pad_token_id": 151643}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_qwen3_moe(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides: Any) -> dict[str, Any]:
    """A 4-layer Qwen3-MoE ``config.json`` (hidden 64, 8 experts top-2, explicit head_dim 32 ≠
    64/4, GQA 4:2, untied embeddings). Dense layers (``mlp_only_layers``) via overrides."""
    config = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "router_aux_loss_coef": 1e-3, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "attention_bias": False, "torch_dtype": "float32", **_tokens(vocab_size),
    }
    config.update(overrides)
    return config


def tiny_qwen3(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides: Any) -> dict[str, Any]:
    """A 2-layer dense Qwen3 ``config.json`` (QK-norm, explicit head_dim, tied embeddings)."""
    config = {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
        "attention_bias": False, "torch_dtype": "float32", **_tokens(vocab_size),
    }
    config.update(overrides)
    return config


def tiny_qwen25(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides: Any) -> dict[str, Any]:
    """A 2-layer Qwen2.5 ``config.json`` (QKV bias, head_dim = hidden/heads, untied)."""
    config = {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "use_sliding_window": False, "torch_dtype": "float32", **_tokens(vocab_size),
    }
    config.update(overrides)
    return config


PRESETS = {"tiny_qwen3_moe": tiny_qwen3_moe, "tiny_qwen3": tiny_qwen3, "tiny_qwen25": tiny_qwen25}


def transformers_config(config: Mapping[str, Any]):
    """The transformers ``PretrainedConfig`` of a ``config.json`` dict (e.g. a preset), to build
    the matching Hugging Face model in code: ``AutoModelForCausalLM.from_config(...)``."""
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    return transformers.AutoConfig.for_model(**fields)
