"""Worker (torchrun, 1 process): HF transformers logits vs our Megatron model's, same weights.

For each case: build the tiny HF model in code, convert its live state dict to on-disk names,
load it into the Megatron GPTModel through models.hf_map, run one packed (THD) micro-batch
of three sequences through both, and save the largest absolute logit difference.
"""

import torch

from tests.models.single_process import packed_params, start

CASES = {
    "qwen3_moe_real_vocab": ("tiny_qwen3_moe", {"vocab_size": 151936}),
    "qwen3_moe_no_norm_topk_tied_mixed_layers": (
        "tiny_qwen3_moe",
        {"vocab_size": 512, "norm_topk_prob": False, "tie_word_embeddings": True, "mlp_only_layers": [1],
         "decoder_sparse_step": 1, "num_hidden_layers": 3},
    ),
    "qwen3_dense_tied": ("tiny_qwen3", {"vocab_size": 512}),
    "qwen25_qkv_bias": ("tiny_qwen25", {"vocab_size": 512}),
}


def main() -> None:
    args = start()
    from luspo_megatron.models import PRESETS, arch_from_hf
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_live_to_disk
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import load_hf_weights
    from tests.hf_models import build_hf_model

    results = {}
    for name, (preset, overrides) in CASES.items():
        config = PRESETS[preset](**overrides)
        hf_model = build_hf_model(config, seed=1)
        arch = arch_from_hf(config)
        chunks = build_model(arch, transformer_config(arch), use_transformer_engine=False)
        loaded = load_hf_weights(chunks, arch, hf_live_to_disk(hf_model.state_dict(), arch.tie_word_embeddings))
        model = chunks[0].eval()
        gen = torch.Generator().manual_seed(2)
        lengths = [7, 12, 5]
        seqs = [torch.randint(0, arch.vocab_size, (n,), generator=gen) for n in lengths]
        packed = packed_params(lengths)
        with torch.no_grad():
            ours = model(torch.cat(seqs)[None], None, None, packed_seq_params=packed)[0]
            theirs = torch.cat([hf_model(input_ids=s[None]).logits[0] for s in seqs])
        results[name] = {
            "max_abs_diff": (ours - theirs).abs().max().item(),
            "logit_scale": theirs.abs().max().item(),
            "params_loaded": loaded,
            "params_total": sum(1 for _ in model.parameters()),
            "shape": tuple(ours.shape),
        }
        del hf_model, chunks, model
    torch.save(results, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
