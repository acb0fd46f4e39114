"""Reading Qwen-family HF configs: one test per detail that differs between the families."""

import pytest
import transformers

from luspo_megatron.errors import ConfigError
from luspo_megatron.models import arch_from_hf, tiny_qwen3, tiny_qwen3_moe, tiny_qwen25, transformers_config


def test_qwen3_explicit_head_dim_is_kept_and_qwen25_derives_it():
    assert arch_from_hf(tiny_qwen3_moe(head_dim=32)).head_dim == 32  # ≠ hidden 64 / 4 heads
    assert arch_from_hf(tiny_qwen3(head_dim=48)).head_dim == 48
    assert arch_from_hf(tiny_qwen25()).head_dim == 64 // 4


def test_gqa_key_value_heads_become_query_groups():
    arch = arch_from_hf(tiny_qwen3_moe(num_attention_heads=8, num_key_value_heads=2))
    assert (arch.num_attention_heads, arch.num_query_groups) == (8, 2)
    assert arch_from_hf(tiny_qwen25(num_key_value_heads=None)).num_query_groups == 4  # MHA default
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        arch_from_hf(tiny_qwen3(num_attention_heads=4, num_key_value_heads=3))


def test_qk_norm_on_qwen3_only_and_qkv_bias_on_qwen25_only():
    flags = {p.__name__: (arch_from_hf(p()).qk_norm, arch_from_hf(p()).qkv_bias)
             for p in (tiny_qwen3_moe, tiny_qwen3, tiny_qwen25)}
    assert flags == {"tiny_qwen3_moe": (True, False), "tiny_qwen3": (True, False), "tiny_qwen25": (False, True)}


@pytest.mark.parametrize(
    "spelling, theta",
    [({"rope_theta": 5e5}, 5e5),
     ({"rope_parameters": {"rope_theta": 2.5e5, "rope_type": "default"}}, 2.5e5),
     ({}, 10000.0)],
)
def test_rope_theta_read_from_either_spelling(spelling, theta):
    config = {k: v for k, v in tiny_qwen3().items() if k != "rope_theta"} | spelling
    assert arch_from_hf(config).rope_theta == theta


def test_rope_theta_matches_what_transformers_5_writes():
    written = transformers_config(tiny_qwen3_moe(rope_theta=123456.0)).to_dict()
    assert "rope_theta" not in written  # transformers 5 moves it into rope_parameters
    assert arch_from_hf(written).rope_theta == 123456.0


def test_scaled_rope_is_rejected():
    with pytest.raises(ConfigError, match="rope_scaling.rope_type"):
        arch_from_hf(tiny_qwen3(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_tied_and_untied_embeddings():
    assert arch_from_hf(tiny_qwen3(tie_word_embeddings=True)).tie_word_embeddings
    assert not arch_from_hf(tiny_qwen3_moe(tie_word_embeddings=False)).tie_word_embeddings


def test_num_experts_and_num_local_experts_spellings():
    official = tiny_qwen3_moe(num_experts=6)
    written = transformers_config(official).to_dict()  # transformers 5 writes num_local_experts
    assert "num_experts" not in written and written["num_local_experts"] == 6
    assert arch_from_hf(official).num_experts == arch_from_hf(written).num_experts == 6


def test_moe_layer_pattern_matches_transformers_layer_classes():
    config = tiny_qwen3_moe(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], vocab_size=128)
    model = transformers.AutoModelForCausalLM.from_config(transformers_config(config))
    sparse = tuple(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)
    arch = arch_from_hf(config)
    assert arch.moe_layers == sparse == (False, True, False, False)


def test_moe_sizes_experts_use_moe_intermediate_dense_layers_intermediate():
    arch = arch_from_hf(tiny_qwen3_moe(intermediate_size=96, moe_intermediate_size=32, num_experts_per_tok=3))
    assert (arch.ffn_hidden_size, arch.moe_ffn_hidden_size, arch.moe_router_topk) == (96, 32, 3)


def test_moe_without_sparse_layers_is_dense():
    arch = arch_from_hf(tiny_qwen3_moe(num_hidden_layers=2, mlp_only_layers=[0, 1]))
    assert not arch.is_moe and arch.num_experts is None


def test_unsupported_models_fail_with_one_line():
    with pytest.raises(ConfigError, match="model_type"):
        arch_from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        arch_from_hf(tiny_qwen25(use_sliding_window=True))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        arch_from_hf(tiny_qwen3_moe(mlp_only_layers=[7]))


def test_tiny_presets_fit_the_size_limits_and_the_real_vocab():
    for preset in (tiny_qwen3_moe, tiny_qwen3, tiny_qwen25):
        arch = arch_from_hf(preset())
        assert arch.hidden_size <= 64 and arch.num_layers <= 4 and arch.vocab_size == 151936
    moe = arch_from_hf(tiny_qwen3_moe())
    assert 4 <= moe.num_experts <= 8
    assert arch_from_hf(tiny_qwen3_moe(vocab_size=512)).vocab_size == 512
