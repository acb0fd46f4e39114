"""The HF ⇄ Megatron name map: round trips, layouts, naming flavours and streaming plans."""

import pytest
import torch
from safetensors.torch import load_file

from luspo_megatron.models import arch_from_hf, tiny_qwen3, tiny_qwen3_moe, tiny_qwen25
from luspo_megatron.models.hf_map import (
    hf_live_to_disk,
    hf_to_megatron,
    megatron_to_hf,
    plans_by_megatron_name,
    tensor_plans,
)
from tests.hf_models import build_hf_model

FAMILIES = {
    "qwen3_moe": tiny_qwen3_moe(vocab_size=256, mlp_only_layers=[2]),
    "qwen3_tied": tiny_qwen3(vocab_size=256),
    "qwen25": tiny_qwen25(vocab_size=256),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    config = FAMILIES[request.param]
    arch = arch_from_hf(config)
    disk = hf_live_to_disk(build_hf_model(config).state_dict(), arch.tie_word_embeddings)
    return arch, disk


@pytest.mark.parametrize("naming", ["local", "te"])
def test_hf_to_megatron_to_hf_is_bit_identical(family, naming):
    arch, disk = family
    megatron = dict(hf_to_megatron(disk, arch, naming))
    back = dict(megatron_to_hf(megatron, arch, naming))
    assert back.keys() == disk.keys()
    for name, tensor in disk.items():
        assert torch.equal(back[name], tensor), name


def test_every_hf_tensor_is_used_and_every_megatron_tensor_has_sources(family):
    arch, disk = family
    plans = tensor_plans(arch)
    used = [name for plan in plans if plan.exported for name in plan.hf]
    assert sorted(used) == sorted(disk)  # each HF tensor feeds exactly one exported Megatron tensor
    assert len({p.megatron for p in plans}) == len(plans)


def test_live_state_dict_conversion_equals_save_pretrained(tmp_path):
    config = FAMILIES["qwen3_moe"]
    model = build_hf_model(config)
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    converted = hf_live_to_disk(model.state_dict())
    assert converted.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(converted[name], tensor), name


def test_qkv_is_interleaved_per_query_group():
    arch = arch_from_hf(tiny_qwen25(vocab_size=256, num_attention_heads=4, num_key_value_heads=2))
    hd = arch.head_dim
    # Tag every row with (kind, head): q heads 0..3, k heads 0..1, v heads 0..1.
    q = torch.arange(4).repeat_interleave(hd).float()[:, None] + 0.0
    k = torch.arange(2).repeat_interleave(hd).float()[:, None] + 10.0
    v = torch.arange(2).repeat_interleave(hd).float()[:, None] + 20.0
    plan = plans_by_megatron_name(arch)["decoder.layers.0.self_attention.linear_qkv.weight"]
    fused = plan.to_megatron([q, k, v], arch)[:, 0]
    heads = fused.reshape(-1, hd)[:, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]  # group 0: q0 q1 k0 v0 | group 1: q2 q3 k1 v1


def test_swiglu_fc1_stacks_gate_before_up():
    arch = arch_from_hf(tiny_qwen3_moe(vocab_size=256))
    plans = plans_by_megatron_name(arch)
    gate, up = torch.zeros(32, 64), torch.ones(32, 64)
    fc1 = plans["decoder.layers.0.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert fc1.hf == ("model.layers.0.mlp.experts.5.gate_proj.weight", "model.layers.0.mlp.experts.5.up_proj.weight")
    fused = fc1.to_megatron([gate, up], arch)
    assert torch.equal(fused[:32], gate) and torch.equal(fused[32:], up)


def test_local_and_te_names():
    arch = arch_from_hf(tiny_qwen3_moe(vocab_size=256, mlp_only_layers=[0]))
    local, te = plans_by_megatron_name(arch, "local"), plans_by_megatron_name(arch, "te")
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in local
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te  # dense: fused into fc1
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te  # MoE layers keep a separate norm
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight" in local
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight7" in te
    assert local["decoder.layers.1.mlp.router.weight"].hf == ("model.layers.1.mlp.gate.weight",)


def test_plans_stream_in_layer_order_with_few_sources_each():
    arch = arch_from_hf(tiny_qwen3_moe(vocab_size=256))
    plans = tensor_plans(arch)
    layers = [p.layer for p in plans if p.layer is not None]
    assert layers == sorted(layers)
    assert max(len(p.hf) for p in plans) == 3  # q, k, v of one layer at most


def test_tied_output_layer_reads_the_embedding_and_is_not_exported():
    arch = arch_from_hf(tiny_qwen3(vocab_size=256, tie_word_embeddings=True))
    plan = plans_by_megatron_name(arch)["output_layer.weight"]
    assert plan.hf == ("model.embed_tokens.weight",) and not plan.exported
    untied = plans_by_megatron_name(arch_from_hf(tiny_qwen25(vocab_size=256)))["output_layer.weight"]
    assert untied.hf == ("lm_head.weight",) and untied.exported


def test_missing_hf_tensor_names_itself():
    arch = arch_from_hf(tiny_qwen3(vocab_size=256))
    with pytest.raises(KeyError, match="model.embed_tokens.weight"):
        next(hf_to_megatron({}, arch))
