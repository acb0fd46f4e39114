"""Hugging Face ⇄ Megatron-Core parameter names and transforms for Qwen3-MoE, Qwen3 and Qwen2.5.

The map is data: one table of :class:`Rule` per building block (shared by all families, plus QK
norm, QKV bias and MoE blocks), combined per family in :data:`FAMILY_RULES`; a handful of named
transforms (:data:`TRANSFORMS`) do the reshaping. Adding a family is adding a table.

Everything works on FULL (unsharded) tensors with GLOBAL layer and expert indices; slicing a
Megatron tensor to a TP/EP/PP rank is the loader's job (``models.weights``). HF names are the
ON-DISK names of ``save_pretrained`` / the released checkpoints (per-expert
``mlp.experts.{e}.gate_proj.weight``); :func:`hf_live_to_disk` converts a live transformers-5
``state_dict()`` (fused 3-D ``mlp.experts.gate_up_proj`` / ``down_proj``) into them.

Streaming: :func:`tensor_plans` lists every Megatron tensor with the HF tensors it needs
(``TensorPlan.hf``), in checkpoint order; :meth:`TensorPlan.assemble` reads those HF tensors one
at a time into the Megatron tensor, so a converter never holds more than one Megatron tensor and
one HF tensor (not q, k and v together, and never a whole model).

Layouts (Megatron side):
- ``linear_qkv`` (weight and, on Qwen2.5, bias): per query group g, its q heads, then its k head,
  then its v head: [ng, (nh/ng + 2), hd, ...] flattened on dim 0; this is what
  ``SelfAttention.get_query_key_value_tensors`` splits.
- ``linear_fc1`` of SwiGLU (dense and each expert): [gate; up] stacked on dim 0, gate first.
- Local spec vs Transformer Engine spec names (``naming="local"`` / ``"te"``): TE fuses the
  input norm into ``linear_qkv.layer_norm_weight`` and the dense pre-MLP norm into
  ``linear_fc1.layer_norm_weight`` (MoE layers keep ``pre_mlp_layernorm``), and names grouped
  experts ``mlp.experts.linear_fc1.weight{e}`` instead of ``mlp.experts.local_experts.{e}.linear_fc1.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from luspo_megatron.models.arch import QwenArch

NAMINGS = ("local", "te")
_LAYER = "decoder.layers.{L}."

# Megatron parameter name of each role, per spec flavour. {L}: global layer, {E}: global expert.
MEGATRON_NAMES: dict[str, dict[str, str]] = {
    "local": {
        "input_norm": _LAYER + "input_layernorm.weight",
        "pre_mlp_norm": _LAYER + "pre_mlp_layernorm.weight",
        "expert_fc1": _LAYER + "mlp.experts.local_experts.{E}.linear_fc1.weight",
        "expert_fc2": _LAYER + "mlp.experts.local_experts.{E}.linear_fc2.weight",
    },
    "te": {
        "input_norm": _LAYER + "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_norm": _LAYER + "mlp.linear_fc1.layer_norm_weight",
        "expert_fc1": _LAYER + "mlp.experts.linear_fc1.weight{E}",
        "expert_fc2": _LAYER + "mlp.experts.linear_fc2.weight{E}",
    },
}
_SHARED_NAMES = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
    "qkv": _LAYER + "self_attention.linear_qkv.weight",
    "qkv_bias": _LAYER + "self_attention.linear_qkv.bias",
    "proj": _LAYER + "self_attention.linear_proj.weight",
    "q_norm": _LAYER + "self_attention.q_layernorm.weight",
    "k_norm": _LAYER + "self_attention.k_layernorm.weight",
    "fc1": _LAYER + "mlp.linear_fc1.weight",
    "fc2": _LAYER + "mlp.linear_fc2.weight",
    "pre_moe_norm": _LAYER + "pre_mlp_layernorm.weight",
    "router": _LAYER + "mlp.router.weight",
}
for _names in MEGATRON_NAMES.values():
    _names.update(_SHARED_NAMES)


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (by role) built from HF tensors (patterns with {L} / {E}).

    ``scope``: where it exists. "model" (once), "untied" / "tied" (output layer), "layer" (every
    layer), "dense_layer" / "moe_layer" (layers of that kind), "expert" (every expert of every
    MoE layer). ``exported=False`` marks a Megatron-side alias that is never written back to HF
    (the pipeline-last stage's copy of a tied embedding)."""

    role: str
    hf: tuple[str, ...]
    transform: str = "copy"
    scope: str = "layer"
    exported: bool = True


_HL = "model.layers.{L}."
BASE_RULES = (
    Rule("embedding", ("model.embed_tokens.weight",), scope="model"),
    Rule("final_norm", ("model.norm.weight",), scope="model"),
    Rule("output", ("lm_head.weight",), scope="untied"),
    Rule("output", ("model.embed_tokens.weight",), scope="tied", exported=False),
    Rule("input_norm", (_HL + "input_layernorm.weight",)),
    Rule("qkv", tuple(_HL + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule("proj", (_HL + "self_attn.o_proj.weight",)),
    Rule("pre_mlp_norm", (_HL + "post_attention_layernorm.weight",), scope="dense_layer"),
    Rule("fc1", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"), "gate_up", "dense_layer"),
    Rule("fc2", (_HL + "mlp.down_proj.weight",), scope="dense_layer"),
)
QK_NORM_RULES = (
    Rule("q_norm", (_HL + "self_attn.q_norm.weight",)),
    Rule("k_norm", (_HL + "self_attn.k_norm.weight",)),
)
QKV_BIAS_RULES = (Rule("qkv_bias", tuple(_HL + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),)
MOE_RULES = (
    Rule("pre_moe_norm", (_HL + "post_attention_layernorm.weight",), scope="moe_layer"),
    Rule("router", (_HL + "mlp.gate.weight",), scope="moe_layer"),
    Rule("expert_fc1", (_HL + "mlp.experts.{E}.gate_proj.weight", _HL + "mlp.experts.{E}.up_proj.weight"),
         "gate_up", "expert"),
    Rule("expert_fc2", (_HL + "mlp.experts.{E}.down_proj.weight",), scope="expert"),
)
FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "qwen2": BASE_RULES + QKV_BIAS_RULES,
    "qwen3": BASE_RULES + QK_NORM_RULES,
    "qwen3_moe": BASE_RULES + QK_NORM_RULES + MOE_RULES,
}


# ------------------------------------------------------------------------------------- transforms
# HF -> Megatron transforms take LOADERS (zero-argument callables), not tensors: they allocate the
# Megatron tensor, then read and place the HF tensors one at a time, so a streaming converter holds
# the Megatron tensor plus one HF tensor, never q, k and v (or gate and up) at once.
Loader = Callable[[], torch.Tensor]


def _qkv_to_megatron(loaders: Sequence[Loader], arch: QwenArch) -> torch.Tensor:
    ng, hd = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // ng
    q = loaders[0]()
    rest = q.shape[1:]
    # [ng, per_group + 2, hd, ...]: per query group its q heads, then its k head, then its v head
    grouped = q.new_empty((ng, per_group + 2, hd, *rest))
    grouped[:, :per_group] = q.reshape(ng, per_group, hd, *rest)
    del q
    grouped[:, per_group] = loaders[1]().reshape(ng, hd, *rest)
    grouped[:, per_group + 1] = loaders[2]().reshape(ng, hd, *rest)
    return grouped.reshape(ng * (per_group + 2) * hd, *rest)


def _qkv_to_hf(tensor: torch.Tensor, arch: QwenArch) -> list[torch.Tensor]:
    ng, hd = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // ng
    rest = tensor.shape[1:]
    grouped = tensor.reshape(ng, (per_group + 2) * hd, *rest)
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    return [q.reshape(ng * per_group * hd, *rest), k.reshape(ng * hd, *rest), v.reshape(ng * hd, *rest)]


def _gate_up_to_megatron(loaders: Sequence[Loader], arch: QwenArch) -> torch.Tensor:
    gate = loaders[0]()
    rows = gate.shape[0]
    fused = gate.new_empty((2 * rows, *gate.shape[1:]))  # [gate; up], gate first
    fused[:rows] = gate
    del gate
    fused[rows:] = loaders[1]()
    return fused


def _gate_up_to_hf(tensor: torch.Tensor, arch: QwenArch) -> list[torch.Tensor]:
    gate, up = tensor.chunk(2, dim=0)
    return [gate, up]


# name -> (HF loaders -> Megatron tensor, Megatron tensor -> HF tensors in Rule.hf order)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda loaders, arch: loaders[0](), lambda tensor, arch: [tensor]),
    "qkv": (_qkv_to_megatron, _qkv_to_hf),
    "gate_up": (_gate_up_to_megatron, _gate_up_to_hf),
}


# ------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class TensorPlan:
    """One full Megatron tensor, the HF tensors it is made of, and how."""

    megatron: str
    hf: tuple[str, ...]
    transform: str
    exported: bool
    layer: int | None = None
    expert: int | None = None

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], arch: QwenArch) -> torch.Tensor:
        """The Megatron tensor from the HF tensors named in ``self.hf`` (in that order)."""
        return self.assemble(dict(zip(self.hf, hf_tensors)).__getitem__, arch)

    def assemble(self, get: Callable[[str], torch.Tensor], arch: QwenArch) -> torch.Tensor:
        """The Megatron tensor, reading each HF tensor with ``get(name)`` only when it is placed."""
        loaders = [lambda name=name: get(name) for name in self.hf]
        return TRANSFORMS[self.transform][0](loaders, arch).contiguous()

    def to_hf(self, tensor: torch.Tensor, arch: QwenArch) -> dict[str, torch.Tensor]:
        """HF name -> tensor, from the full Megatron tensor."""
        parts = TRANSFORMS[self.transform][1](tensor, arch)
        return {name: part.contiguous() for name, part in zip(self.hf, parts)}


def _scope_holds(scope: str, arch: QwenArch, layer: int | None) -> bool:
    return {
        "model": True,
        "untied": not arch.tie_word_embeddings,
        "tied": arch.tie_word_embeddings,
        "layer": True,
        "dense_layer": layer is not None and not arch.is_moe_layer(layer),
        "moe_layer": layer is not None and arch.is_moe_layer(layer),
        "expert": layer is not None and arch.is_moe_layer(layer),
    }[scope]


def tensor_plans(arch: QwenArch, naming: str = "local") -> list[TensorPlan]:
    """Every Megatron tensor of ``arch`` (global names) with its HF sources: model-level tensors
    first, then layer by layer (experts in order), which is the order of the HF checkpoints."""
    if naming not in NAMINGS:
        raise ValueError(f"naming: expected one of {NAMINGS}, got {naming!r}")
    names = MEGATRON_NAMES[naming]
    rules = FAMILY_RULES[arch.family]
    plans: list[TensorPlan] = []
    for rule in rules:
        if rule.scope in ("model", "untied", "tied") and _scope_holds(rule.scope, arch, None):
            plans.append(TensorPlan(names[rule.role], rule.hf, rule.transform, rule.exported))
    for layer in range(arch.num_layers):
        for rule in rules:
            if rule.scope in ("model", "untied", "tied") or not _scope_holds(rule.scope, arch, layer):
                continue
            experts = range(arch.num_experts) if rule.scope == "expert" else [None]
            for expert in experts:
                fill = {"L": layer, "E": expert}
                plans.append(TensorPlan(
                    names[rule.role].format(**fill),
                    tuple(h.format(**fill) for h in rule.hf),
                    rule.transform, rule.exported, layer, expert,
                ))
    return plans


def plans_by_megatron_name(arch: QwenArch, naming: str = "local") -> dict[str, TensorPlan]:
    return {plan.megatron: plan for plan in tensor_plans(arch, naming)}


def megatron_naming(use_transformer_engine: bool) -> str:
    return "te" if use_transformer_engine else "local"


TensorSource = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


def tensor_getter(source: TensorSource) -> Callable[[str], torch.Tensor]:
    if isinstance(source, Mapping):
        def get(name: str) -> torch.Tensor:
            if name not in source:
                raise KeyError(f"missing tensor {name!r}")
            return source[name]
        return get
    return source


def hf_to_megatron(hf: TensorSource, arch: QwenArch, naming: str = "local") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (global Megatron name, full tensor), reading each HF tensor only when needed."""
    get = tensor_getter(hf)
    for plan in tensor_plans(arch, naming):
        yield plan.megatron, plan.assemble(get, arch)


def megatron_to_hf(megatron: TensorSource, arch: QwenArch, naming: str = "local") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF on-disk name, tensor) from full Megatron tensors with global names."""
    get = tensor_getter(megatron)
    for plan in tensor_plans(arch, naming):
        if plan.exported:
            yield from plan.to_hf(get(plan.megatron), arch).items()


def hf_name_map(arch: QwenArch, naming: str = "local") -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """``name_map(global megatron name, full tensor) -> [(HF on-disk name, tensor), ...]`` for the
    streaming exporter (``parallel/export.py``): ``[]`` for what HF does not store (``_extra_state``,
    a tied output layer)."""
    plans = plans_by_megatron_name(arch, naming)

    def name_map(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.endswith("._extra_state"):
            return []
        plan = plans.get(name)
        if plan is None:
            raise KeyError(f"{name}: no Hugging Face name for this Megatron parameter ({arch.family})")
        return list(plan.to_hf(tensor, arch).items()) if plan.exported else []

    return name_map


_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def hf_live_to_disk(
    state_dict: Mapping[str, torch.Tensor], tie_word_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """A live transformers-5 ``state_dict()`` in on-disk names: fused 3-D experts
    (``gate_up_proj`` [E, 2I, H], gate first; ``down_proj`` [E, H, I]) become per-expert
    ``experts.{e}.{gate,up,down}_proj.weight``; a tied ``lm_head.weight`` is dropped as
    ``save_pretrained`` does. Other tensors pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix = match["prefix"]
        for e in range(tensor.shape[0]):
            if match["kind"] == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
    return out
