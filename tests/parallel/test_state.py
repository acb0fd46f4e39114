"""Bad parallel layouts: one one-line ConfigError per rule, raised before any process group."""

import pytest

from luspo_megatron.config import ParallelConfig
from luspo_megatron.errors import ConfigError
from luspo_megatron.models import arch_from_hf, tiny_qwen3, tiny_qwen3_moe
from luspo_megatron.parallel.state import validate_parallel

MOE = arch_from_hf(tiny_qwen3_moe(vocab_size=256))  # 4 layers, 4 heads, 2 kv heads, 8 experts, moe ffn 32
DENSE = arch_from_hf(tiny_qwen3(vocab_size=256))


def error_of(arch, world, **layout) -> str:
    with pytest.raises(ConfigError) as info:
        validate_parallel(ParallelConfig(**layout), arch, world)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_world_size_must_be_divisible_by_tp_pp_cp():
    message = error_of(MOE, 6, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert "--tensor-model-parallel-size" in message and "world size 6" in message and "= 4" in message


def test_attention_heads_must_be_divisible_by_tp():
    message = error_of(arch_from_hf(tiny_qwen3_moe(num_attention_heads=6, num_key_value_heads=6)), 4,
                       tensor_model_parallel_size=4)
    assert "6 attention heads" in message and "got 4" in message


def test_query_groups_must_be_divisible_by_tp():
    message = error_of(MOE, 4, tensor_model_parallel_size=4)  # 4 heads but 2 key/value heads
    assert "2 key/value heads" in message and "got 4" in message


def test_vocab_and_ffn_must_be_divisible_by_tp():
    message = error_of(arch_from_hf(tiny_qwen3(vocab_size=255)), 2, tensor_model_parallel_size=2)
    assert "vocab_size 255" in message


def test_layers_must_be_divisible_by_pp_times_vpp():
    message = error_of(MOE, 2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4)
    assert "--virtual-pipeline-model-parallel-size" in message and "4 layers" in message and "= 8" in message


def test_experts_must_be_divisible_by_ep():
    message = error_of(arch_from_hf(tiny_qwen3_moe(num_experts=6)), 4, expert_model_parallel_size=4)
    assert "--expert-model-parallel-size" in message and "6 experts" in message


def test_expert_parallel_needs_a_moe_model():
    assert "dense" in error_of(DENSE, 2, expert_model_parallel_size=2)


def test_expert_ffn_must_be_divisible_by_etp():
    message = error_of(arch_from_hf(tiny_qwen3_moe(moe_intermediate_size=30)), 4, expert_tensor_parallel_size=4)
    assert "--expert-tensor-parallel-size" in message and "moe_intermediate_size 30" in message


def test_world_size_must_be_divisible_by_etp_ep_pp():
    message = error_of(MOE, 2, expert_model_parallel_size=4)
    assert "etp·ep·pp" in message and "world size 2" in message


def test_valid_layouts_pass():
    for world, layout in [(1, {}), (2, {"tensor_model_parallel_size": 2}), (4, {"expert_model_parallel_size": 4}),
                          (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
                          (4, {"context_parallel_size": 2, "tensor_model_parallel_size": 2,
                               "expert_model_parallel_size": 2})]:
        validate_parallel(ParallelConfig(**layout), MOE, world)


def test_expert_tp_below_tp_needs_expert_parallelism():
    message = error_of(MOE, 2, tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert "--expert-tensor-parallel-size" in message and "got 1" in message
    validate_parallel(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                     expert_tensor_parallel_size=1), MOE, 4)  # tp2×ep2 etp1 is fine
