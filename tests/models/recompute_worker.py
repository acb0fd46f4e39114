"""Worker (torchrun, 1 process): the gradient of a Qwen3-MoE with activation recompute equals the
gradient without, for every recompute setting megatron-core accepts, sequential and grouped experts.

One packed (THD) micro-batch of three sequences, the model in training mode, loss = Σ logits · w with
a fixed random w; the same HF weights in every model. Saved per setting: the largest absolute
difference of the logits and of every parameter gradient from the no-recompute model with the same
experts, the largest gradient, and how often core attention ran without and with recompute (so that
the comparison is not vacuous: recompute did happen).
"""

import torch

from tests.models.single_process import packed_params, start

SETTINGS = {
    "selective": {"recompute_granularity": "selective"},
    "full_uniform_1": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_uniform_2": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    "full_block_2": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
}


def main() -> None:
    args = start()
    from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_live_to_disk
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import load_hf_weights
    from tests.hf_models import build_hf_model

    hf_config = tiny_qwen3_moe(vocab_size=128)
    arch = arch_from_hf(hf_config)
    weights = hf_live_to_disk(build_hf_model(hf_config, seed=3).state_dict(), arch.tie_word_embeddings)
    gen = torch.Generator().manual_seed(4)
    lengths = [9, 14, 5]
    tokens = torch.randint(0, arch.vocab_size, (1, sum(lengths)), generator=gen)
    upstream = torch.randn(1, sum(lengths), arch.vocab_size, generator=gen)
    packed = packed_params(lengths)

    def run(grouped: bool, flags: dict):
        config = transformer_config(arch, moe_grouped_gemm=grouped, **flags)
        (model,) = build_model(arch, config, use_transformer_engine=False)
        load_hf_weights([model], arch, weights)
        calls = []  # core attention runs: once per layer, again for each recomputed one
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
        model.train()
        logits = model(tokens, None, None, packed_seq_params=packed)
        (logits * upstream).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    results = {}
    for grouped in (False, True):
        base_logits, base_grads, base_calls = run(grouped, {})
        for name, flags in SETTINGS.items():
            logits, grads, calls = run(grouped, flags)
            assert sorted(grads) == sorted(base_grads)
            results[(grouped, name)] = {
                "logits": (logits - base_logits).abs().max().item(),
                "grads": max((grads[n] - base_grads[n]).abs().max().item() for n in base_grads),
                "largest_grad": max(g.abs().max().item() for g in base_grads.values()),
                "num_grads": len(base_grads),
                "attention_calls": (base_calls, calls),
            }
    torch.save(results, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
