"""Worker (torchrun, 2 processes): HF -> Megatron -> HF with both ranks converting, then logits of
our Megatron model loaded from the converted checkpoint, in several layouts, against transformers'.

For each family: rank 0 writes a tiny random HF model (Qwen3-MoE in 20 shards); both ranks convert
it (each writes its share): Qwen3-MoE through the library (to return each rank's streaming
statistics), the others through the two tools' ``main`` (as torchrun would run them), plus: an
``--allow-extra`` conversion, a ``--dtype bf16`` export. Then for each layout the model is built,
loaded with ``load_model_weights`` (resharding on load) and run on fixed packed tokens; the
vocab-parallel logits are gathered and compared with the HF model's (float32).
"""

import argparse
from pathlib import Path

import torch

from luspo_megatron.runtime import cpu_compat

FAMILIES = {
    "qwen3_moe": ("tiny_qwen3_moe", {"vocab_size": 256, "mlp_only_layers": [1]}),
    "qwen3": ("tiny_qwen3", {"vocab_size": 256}),
    "qwen25": ("tiny_qwen25", {"vocab_size": 256}),
}
# (tp, ep, etp); ep only for MoE
LAYOUTS = {"tp1": (1, 1, 1), "tp2_ep2": (2, 2, 1)}
SHARDS = {"qwen3_moe": 20, "qwen3": 3, "qwen25": 4}
EXPORT_SHARD_SIZE = "60KB"



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from transformers import AutoModelForCausalLM

    from luspo_megatron.checkpoint.convert import TargetLayout, distributed_session
    from luspo_megatron.checkpoint.hf_import import convert_hf_to_megatron, prepare_hf_import
    from luspo_megatron.checkpoint.training import load_model_weights
    from luspo_megatron.config import ParallelConfig
    from luspo_megatron.models import PRESETS, arch_from_hf
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.megatron_config import transformer_config
    from tests.checkpoint.helpers import tool_main, write_hf_dir
    from tests.checkpoint.logits import megatron_logits, sequences, transformers_logits

    hf_to_megatron, megatron_to_hf = tool_main("convert_hf_to_megatron"), tool_main("convert_megatron_to_hf")
    rank = torch.distributed.get_rank()
    work = Path(args.work)
    results = {}
    for family, (preset, overrides) in FAMILIES.items():
        config = PRESETS[preset](**overrides)
        hf_dir, meg_dir, back_dir = work / f"{family}_hf", work / f"{family}_megatron", work / f"{family}_back"
        if rank == 0:
            write_hf_dir(config, hf_dir, shards=SHARDS[family], seed=3)
            if family == "qwen25":
                write_hf_dir(config, work / "extra_hf", seed=3, extra={"model.unused.weight": torch.ones(3)})
        torch.distributed.barrier()
        ep = 2 if family == "qwen3_moe" else 1
        family_result = {"logits": {}}
        if family == "qwen3_moe":  # the library, for each rank's streaming statistics
            target = TargetLayout(tp=2, ep=ep)
            with distributed_session():
                report = convert_hf_to_megatron(prepare_hf_import(hf_dir, meg_dir, target), target)
            reports = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(reports, report)
            family_result["reports"] = reports
        else:
            progress = [] if family == "qwen3" else ["--no-progress"]
            family_result["import_rc"] = hf_to_megatron(["--hf-dir", str(hf_dir), "--save", str(meg_dir),
                                                         "--target-tp", "2", *progress])
        family_result["export_rc"] = megatron_to_hf(["--load", str(meg_dir), "--save", str(back_dir),
                                                     "--max-shard-size", EXPORT_SHARD_SIZE, "--no-progress"])
        if family == "qwen3":
            family_result["bf16_export_rc"] = megatron_to_hf(["--load", str(meg_dir), "--save",
                                                              str(work / "qwen3_back_bf16"), "--dtype", "bf16",
                                                              "--no-progress"])
        if family == "qwen25":
            family_result["extra_rc"] = hf_to_megatron(["--hf-dir", str(work / "extra_hf"), "--save",
                                                        str(work / "extra_megatron"), "--allow-extra",
                                                        "--no-progress"])

        arch = arch_from_hf(config)
        seqs = sequences(arch.vocab_size)
        theirs = transformers_logits(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), seqs)
        for name, (tp, ep, etp) in LAYOUTS.items():
            if ep > 1 and not arch.is_moe:
                ep = 1
            parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                      expert_tensor_parallel_size=etp)
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                                     expert_tensor_parallel_size=etp)
            tensor_parallel.model_parallel_cuda_manual_seed(11)
            chunks = build_model(arch, transformer_config(arch, parallel), use_transformer_engine=False)
            load_model_weights(meg_dir, chunks)
            ours = megatron_logits(chunks[0], seqs)
            family_result["logits"][name] = {
                "max_abs_diff": (ours - theirs).abs().max().item(),
                "logit_scale": theirs.abs().max().item(),
                "layout": (tp, ep, etp),
            }
            del chunks
            parallel_state.destroy_model_parallel()
        results[family] = family_result
    if rank == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
