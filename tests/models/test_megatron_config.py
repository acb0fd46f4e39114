"""HF config -> megatron.core TransformerConfig: one test per mapped detail."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from luspo_megatron.config import ParallelConfig
from luspo_megatron.errors import ConfigError
from luspo_megatron.models import arch_from_hf, tiny_qwen3, tiny_qwen3_moe, tiny_qwen25, transformers_config
from luspo_megatron.models.megatron_config import transformer_config


def config_of(hf_config, **kwargs):
    return transformer_config(arch_from_hf(hf_config), cuda=False, **kwargs)


def test_head_dim_becomes_kv_channels_and_kv_heads_query_groups():
    config = config_of(tiny_qwen3_moe(head_dim=32, num_attention_heads=4, num_key_value_heads=2))
    assert (config.kv_channels, config.num_attention_heads, config.num_query_groups) == (32, 4, 2)
    assert config_of(tiny_qwen25()).kv_channels == 16


def test_qk_layernorm_on_qwen3_and_only_qkv_bias_on_qwen25():
    qwen3, qwen25 = config_of(tiny_qwen3()), config_of(tiny_qwen25())
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias
    assert not qwen25.qk_layernorm and qwen25.add_qkv_bias
    assert not qwen3.add_bias_linear and not qwen25.add_bias_linear  # no o_proj / MLP bias


def test_swiglu_rmsnorm_and_eps():
    config = config_of(tiny_qwen3(rms_norm_eps=1e-5))
    assert config.gated_linear_unit and config.activation_func is F.silu
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5


def test_dense_layers_use_intermediate_size_experts_moe_intermediate_size():
    config = config_of(tiny_qwen3_moe(intermediate_size=96, moe_intermediate_size=32, mlp_only_layers=[0]))
    assert (config.ffn_hidden_size, config.moe_ffn_hidden_size) == (96, 32)


def test_num_experts_and_top_k():
    config = config_of(transformers_config(tiny_qwen3_moe(num_experts=6, num_experts_per_tok=3)).to_dict())
    assert (config.num_moe_experts, config.moe_router_topk) == (6, 3)


def test_per_layer_moe_pattern_becomes_moe_layer_freq_list():
    config = config_of(tiny_qwen3_moe(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert config.moe_layer_freq == [0, 1, 0, 0]


def test_router_aux_loss_coef_and_its_override():
    assert config_of(tiny_qwen3_moe(router_aux_loss_coef=0.01)).moe_aux_loss_coeff == 0.01
    overridden = config_of(tiny_qwen3_moe(router_aux_loss_coef=0.01), moe_aux_loss_coef=0.0)
    assert overridden.moe_aux_loss_coeff == 0.0 and overridden.moe_router_load_balancing_type == "none"


def test_router_computes_in_float32_even_with_bf16_params():
    config = config_of(tiny_qwen3_moe(), dtype="bf16")
    assert config.params_dtype == torch.bfloat16 and config.moe_router_dtype == "fp32"


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_norm_topk_prob_routing_weights_equal_transformers_router(norm_topk_prob):
    hf_config = tiny_qwen3_moe(num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    config = config_of(hf_config)
    assert config.moe_router_pre_softmax is (not norm_topk_prob)
    router = Qwen3MoeTopKRouter(transformers_config(hf_config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64, generator=gen))
    hidden = torch.randn(50, 64, generator=gen)
    _, hf_weights, hf_experts = router(hidden)
    probs, routing_map = topk_routing_with_score_function(
        F.linear(hidden, router.weight.detach()), config.moe_router_topk,
        use_pre_softmax=config.moe_router_pre_softmax, score_function=config.moe_router_score_function,
    )
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, hf_experts, True))
    torch.testing.assert_close(probs.gather(1, hf_experts), hf_weights.detach(), rtol=1e-6, atol=1e-7)
    sums = probs.sum(dim=1)
    assert torch.allclose(sums, torch.ones_like(sums)) is norm_topk_prob  # renormalised or not


def test_sequence_parallel_forced_on_for_moe_with_tensor_parallel():
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    assert config_of(tiny_qwen3_moe(), parallel=tp2).sequence_parallel
    assert not config_of(tiny_qwen3(), parallel=tp2).sequence_parallel  # dense: as asked
    assert config_of(tiny_qwen3(), parallel=ParallelConfig(tensor_model_parallel_size=2,
                                                             sequence_parallel=True)).sequence_parallel
    assert not config_of(tiny_qwen3_moe(), parallel=ParallelConfig(sequence_parallel=True)).sequence_parallel


def test_cpu_settings_avoid_the_gloo_traps():
    config = config_of(tiny_qwen3_moe())
    assert config.use_cpu_initialization and not config.batch_p2p_comm and config.variable_seq_lengths
    assert not config.moe_grouped_gemm and config.moe_token_dispatcher_type == "alltoall"


def test_top1_with_renormalisation_is_refused():
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        config_of(tiny_qwen3_moe(num_experts_per_tok=1, norm_topk_prob=True))


# ------------------------------------------------------------------- issue 16: experts and recompute
def test_moe_grouped_gemm_auto_is_on_with_cuda_off_on_cpu_and_always_on_with_te():
    arch = arch_from_hf(tiny_qwen3_moe())
    assert not transformer_config(arch, cuda=False).moe_grouped_gemm
    assert transformer_config(arch, cuda=False, moe_grouped_gemm=True).moe_grouped_gemm
    assert transformer_config(arch, cuda=True, use_cpu_initialization=True).moe_grouped_gemm
    assert not transformer_config(arch, cuda=True, moe_grouped_gemm=False, use_cpu_initialization=True).moe_grouped_gemm
    assert transformer_config(arch, cuda=False, use_transformer_engine=True).moe_grouped_gemm
    with pytest.raises(ConfigError, match="^--moe-grouped-gemm: expected true or unset with Transformer Engine"):
        transformer_config(arch, cuda=False, use_transformer_engine=True, moe_grouped_gemm=False)


@pytest.mark.parametrize("flags, fields", [
    ({}, (None, None, None)),
    ({"recompute_granularity": "selective"}, ("selective", None, None)),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
     ("full", "uniform", 1)),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 4},
     ("full", "block", 4)),
])
def test_recompute_flags_reach_megatron(flags, fields):
    config = config_of(tiny_qwen3_moe(), **flags)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == fields
    if fields[0] == "selective":
        assert config.recompute_modules == ["core_attn"]


@pytest.mark.parametrize("flags, message", [
    ({"recompute_method": "uniform"}, "^--recompute-method: expected unset without --recompute-granularity full"),
    ({"recompute_num_layers": 2}, "^--recompute-num-layers: expected unset without --recompute-granularity full"),
    ({"recompute_granularity": "partial"}, "^--recompute-granularity: expected one of"),
    ({"recompute_granularity": "selective", "recompute_method": "block"}, "^--recompute-method: expected unset with"),
    ({"recompute_granularity": "selective", "recompute_num_layers": 1}, "^--recompute-num-layers: expected unset"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, "^--recompute-method: expected one of"),
    ({"recompute_granularity": "full", "recompute_method": "block"},
     r"^--recompute-num-layers: expected an integer in \[1, 4\]"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 5},
     r"^--recompute-num-layers: expected an integer in \[1, 4\]"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 3},
     "^--recompute-num-layers: expected a divisor of the 4 layers"),
])
def test_recompute_combinations_megatron_rejects_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        config_of(tiny_qwen3_moe(), **flags)


def test_full_recompute_bound_is_per_pipeline_chunk_and_refused_with_replay_under_pipelining():
    arch = arch_from_hf(tiny_qwen3_moe())
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    full = {"recompute_granularity": "full", "recompute_method": "block"}
    assert transformer_config(arch, pp2, cuda=False, recompute_num_layers=2, **full).recompute_num_layers == 2
    with pytest.raises(ConfigError, match=r"^--recompute-num-layers: expected an integer in \[1, 2\]"):
        transformer_config(arch, pp2, cuda=False, recompute_num_layers=3, **full)
    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"^--recompute-num-layers: expected an integer in \[1, 1\]"):
        transformer_config(arch, vpp, cuda=False, recompute_num_layers=2, **full)
    with pytest.raises(ConfigError, match="^--recompute-granularity: expected selective or unset with "
                                          "--use-rollout-routing-replay"):
        transformer_config(arch, pp2, cuda=False, recompute_num_layers=2, routing_replay=True, **full)
    transformer_config(arch, pp2, cuda=False, routing_replay=True, recompute_granularity="selective")


def test_model_config_flags_parse_and_bad_combinations_fail_at_load():
    from luspo_megatron.config import config_from_dict, load_config

    config, _ = load_config(["--moe-grouped-gemm", "--attention-backend", "causal", "--recompute-granularity", "full",
                             "--recompute-method", "block", "--recompute-num-layers", "2"])
    m = config.model
    assert (m.moe_grouped_gemm, m.attention_backend) == (True, "causal")
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "block", 2)
    default = load_config([])[0].model
    assert (default.moe_grouped_gemm, default.attention_backend, default.recompute_granularity) == (None, "auto", None)
    assert config_from_dict({"model": {"moe_grouped_gemm": False}}).model.moe_grouped_gemm is False
    for model, message in [
        ({"recompute_granularity": "full", "recompute_method": "uniform"},
         "^--recompute-num-layers: expected a positive"),
        ({"recompute_granularity": "full", "recompute_num_layers": 1},
         "^--recompute-method: expected uniform or block"),
        ({"recompute_method": "block"}, "^--recompute-method: expected unset without --recompute-granularity full"),
        ({"recompute_granularity": "selective", "recompute_num_layers": 1},
         "^--recompute-num-layers: expected unset with --recompute-granularity selective"),
        ({"attention_backend": "flash"}, "^--attention-backend: expected one of auto"),
        ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 0},
         "^--recompute-num-layers: expected a positive integer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"model": model})
