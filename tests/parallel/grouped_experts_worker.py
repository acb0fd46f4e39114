"""Worker (torchrun, 1 or 2 processes): grouped experts (models/experts.py) against megatron's
SequentialMLP, inside real megatron MoELayers and real GPTModels, for several layouts.

``--layouts``: for each layout, a sequential and a grouped MoELayer built from our decoder spec,
with the same weights (the sequential layer's state dict loaded, strict, into the grouped one) and
forced routing (megatron's router replay): forward and backward on the same input and upstream
gradient. Saved per layout and routing: the largest differences of the output, the input gradient
and every parameter gradient, in float64 (the loop backend: the same math as SequentialMLP, so
exactly 0 is expected) and in float32 through the torch grouped_mm kernel, against the float64
sequential result (relative). Routings: "mixed" (two of the eight experts get no token) and
"first_two" (every token to experts 0 and 1: with ep2 the second rank's experts get zero tokens in
total). Plus the experts module called directly with zero tokens.

``--model-layouts``: a tiny HF Qwen3-MoE converted to a Megatron dist checkpoint (the library), loaded
into a sequential and a grouped GPTModel per layout: every local parameter equal, the same logits
(float32, the grouped model through the kernel; relative difference saved), the gathered HF
export of both equal to the original tensors bit for bit, and the grouped model saved as a training
checkpoint and exported back to HF (tools/convert_megatron_to_hf.py) bit for bit.

``--device cuda`` (one process): the grouped experts in bf16 through the kernel against float64, next
to the sequential ones in bf16 (benchmarks/gpu_check.sh runs it).

Layout names: ep1 (dp over the processes), ep2, tp2etp1 (tp 2, expert-tp 1, sequence parallel),
tp2etp2 (the experts sharded over tp too).
"""

import argparse
from pathlib import Path

import torch

from luspo_megatron.runtime import cpu_compat

LAYOUTS = {"ep1": (1, 1, 1), "ep2": (1, 2, 1), "tp2etp1": (2, 1, 1), "tp2etp2": (2, 1, 2)}  # (tp, ep, etp)
CONFIG = {"vocab_size": 256}
TOKENS = 24  # per DP replica, before sequence-parallel scattering
ROUTINGS = ("mixed", "first_two")


def _arch():
    from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe

    return arch_from_hf(tiny_qwen3_moe(**CONFIG))


def _init(layout: str):
    from megatron.core import parallel_state, tensor_parallel

    from luspo_megatron.config import ParallelConfig

    tp, ep, etp = LAYOUTS[layout]
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    return ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp)


# ---------------------------------------------------------------------------------------- MoE layer
def _moe_layer(arch, parallel, grouped: bool, dtype: torch.dtype):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from luspo_megatron.models.build import decoder_block_spec
    from luspo_megatron.models.megatron_config import transformer_config

    router_dtype = "fp64" if dtype == torch.float64 else "fp32"
    config = transformer_config(arch, parallel, moe_grouped_gemm=grouped, routing_replay=True, params_dtype=dtype,
                                moe_router_dtype=router_dtype)
    spec = decoder_block_spec(config, use_transformer_engine=False).layer_specs[0].submodules.mlp
    return build_module(spec, config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                        layer_number=1)


def _inputs(routing: str, dtype: torch.dtype, device: str = "cpu"):
    """This rank's MoE input [s, 1, H], upstream gradient and replayed top-2 experts (the same on every
    rank of a TP group before sequence-parallel scattering; different across DP/EP replicas)."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(1000 + ps.get_data_parallel_rank())
    x = torch.randn(TOKENS, 1, 64, generator=gen, dtype=torch.float64)
    grad = torch.randn(TOKENS, 1, 64, generator=gen, dtype=torch.float64)
    if routing == "mixed":  # experts 3 and 6 never chosen
        allowed = torch.tensor([0, 1, 2, 4, 5, 7])
        idx = torch.stack([allowed[torch.randperm(6, generator=gen)[:2]] for _ in range(TOKENS)])
    else:
        idx = torch.tensor([[0, 1]] * TOKENS)
    part = slice(tp_rank * TOKENS // tp, (tp_rank + 1) * TOKENS // tp)  # sequence parallel
    return x[part].to(device, dtype), grad[part].to(device, dtype), idx[part]


def _run(layer, x, grad, idx):
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    layer.zero_grad(set_to_none=True)
    replay = layer.router.router_replay
    replay.clear_indices()
    replay.set_target_indices(idx)
    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    x = x.clone().requires_grad_()
    out = layer(x)[0]
    (out * grad).sum().backward()
    replay.clear_indices()
    replay.clear_router_replay_action()
    return out.detach().double(), x.grad.double(), {n: p.grad.double() for n, p in layer.named_parameters()}


def _max_diff(a, b, relative: bool = False) -> float:
    scale = b.abs().max().clamp_min(1e-30).item() if relative else 1.0
    return (a - b).abs().max().item() / scale if a.numel() else 0.0


def _compare(got, want, relative: bool) -> dict:
    out, dx, grads = got
    ref_out, ref_dx, ref_grads = want
    assert sorted(grads) == sorted(ref_grads), "parameter names differ"
    return {
        "out": _max_diff(out, ref_out, relative),
        "dx": _max_diff(dx, ref_dx, relative),
        "grads": max(_max_diff(grads[n], ref_grads[n], relative) for n in ref_grads),
        "num_grads": len(ref_grads),
        "zero_expert_grads": sum(int(grads[n].abs().max() == 0) for n in grads if "local_experts" in n),
    }


def moe_case(layout: str) -> dict:
    from luspo_megatron.models.experts import GroupedExperts

    arch = _arch()
    parallel = _init(layout)
    seq64 = _moe_layer(arch, parallel, False, torch.float64)
    grp64 = _moe_layer(arch, parallel, True, torch.float64)
    grp32 = _moe_layer(arch, parallel, True, torch.float32)
    assert isinstance(grp64.experts, GroupedExperts) and not isinstance(seq64.experts, GroupedExperts)
    grp64.load_state_dict(seq64.state_dict(), strict=True)
    grp32.load_state_dict({k: v.float() if torch.is_tensor(v) else v for k, v in seq64.state_dict().items()},
                          strict=True)
    grp32.experts.mm_backend = "kernel"  # refuse silently falling back to the loop
    result = {"stacked": grp64.experts.weights_stacked() and grp32.experts.weights_stacked(), "routings": {}}
    for routing in ROUTINGS:
        x, grad, idx = _inputs(routing, torch.float64)
        want = _run(seq64, x, grad, idx)
        counts = torch.bincount(idx.flatten(), minlength=8)
        result["routings"][routing] = {
            "float64": _compare(_run(grp64, x, grad, idx), want, relative=False),
            "float32_kernel": _compare(_run(grp32, x.float(), grad.float(), idx), want, relative=True),
            "routed_counts": counts.tolist(),
        }
    result["zero_tokens"] = _zero_tokens(arch, seq64, grp64, torch.float64, "cpu")
    return result


def _zero_tokens(arch, sequential, grouped, dtype, device) -> dict:
    """The experts module alone with zero tokens: empty output, zero weight gradients."""
    outs = []
    for layer in (sequential, grouped):
        layer.zero_grad(set_to_none=True)
        x = torch.zeros(0, arch.hidden_size, dtype=dtype, device=device, requires_grad=True)
        y, _ = layer.experts(x, torch.zeros(layer.experts.num_local_experts, dtype=torch.long),
                             torch.zeros(0, dtype=dtype, device=device))
        y.sum().backward()
        grads = [p.grad for p in layer.experts.parameters()]
        outs.append((tuple(y.shape), all(g is not None and g.abs().max() == 0 for g in grads)))
    return {"sequential": outs[0], "grouped": outs[1]}


def moe_case_cuda() -> dict:
    """One process on the GPU: the grouped experts in bf16 through the kernel, and the sequential ones in
    bf16, both against the sequential ones in float64 (relative); zero-token experts; the stacked storage
    after build_model's move to the GPU."""
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.experts import GroupedExperts
    from luspo_megatron.models.megatron_config import transformer_config

    arch = _arch()
    parallel = _init("ep1")
    seq64 = _moe_layer(arch, parallel, False, torch.float64)
    seq16 = _moe_layer(arch, parallel, False, torch.bfloat16)
    grp16 = _moe_layer(arch, parallel, True, torch.bfloat16)
    state = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in seq64.state_dict().items()}
    seq16.load_state_dict(state, strict=True)
    grp16.load_state_dict(state, strict=True)
    grp16.experts.mm_backend = "kernel"
    result = {"device": torch.cuda.get_device_name(), "stacked": grp16.experts.weights_stacked(), "routings": {}}
    for routing in ROUTINGS:
        x, grad, idx = _inputs(routing, torch.float64, "cuda")
        want = _run(seq64, x, grad, idx)
        result["routings"][routing] = {
            "bf16_kernel": _compare(_run(grp16, x.bfloat16(), grad.bfloat16(), idx), want, relative=True),
            "bf16_sequential": _compare(_run(seq16, x.bfloat16(), grad.bfloat16(), idx), want, relative=True),
            "routed_counts": torch.bincount(idx.flatten(), minlength=8).tolist(),
        }
    result["zero_tokens"] = _zero_tokens(arch, seq16, grp16, torch.bfloat16, "cuda")
    config = transformer_config(arch, parallel, dtype="bf16", moe_grouped_gemm=True)
    (model,) = build_model(arch, config, use_transformer_engine=False)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    result["model_stacked"] = (len(experts), all(m.weights_stacked() for m in experts),
                               next(model.parameters()).device.type)
    return result


# -------------------------------------------------------------------------------------------- model
def model_case(work: Path, layouts: list[str]) -> dict:
    from megatron.core import parallel_state

    from luspo_megatron.checkpoint.convert import TargetLayout, distributed_session
    from luspo_megatron.checkpoint.hf_import import convert_hf_to_megatron, prepare_hf_import
    from luspo_megatron.checkpoint.training import load_model_weights, save_checkpoint
    from luspo_megatron.models import tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.experts import GroupedExperts
    from luspo_megatron.models.hf_map import hf_name_map
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.parallel.export import export_policy_weights
    from tests.checkpoint.helpers import read_tensors, tool_main, write_hf_dir
    from tests.checkpoint.logits import megatron_logits, sequences

    parallel_state.destroy_model_parallel()  # the converter sets up its own (one-process) groups
    rank = torch.distributed.get_rank()
    config = tiny_qwen3_moe(**CONFIG)
    arch = _arch()
    hf_dir, meg_dir = work / "hf", work / "megatron"
    if rank == 0:
        write_hf_dir(config, hf_dir, seed=5)
    torch.distributed.barrier()
    with distributed_session():
        convert_hf_to_megatron(prepare_hf_import(hf_dir, meg_dir, TargetLayout()), TargetLayout())
    original = read_tensors(hf_dir)
    export = tool_main("convert_megatron_to_hf")
    results = {}
    for layout in layouts:
        parallel = _init(layout)
        chunks = {}
        for grouped in (False, True):
            chunks[grouped] = build_model(arch, transformer_config(arch, parallel, moe_grouped_gemm=grouped),
                                          use_transformer_engine=False)
            load_model_weights(meg_dir, chunks[grouped])
        grouped_modules = [m for m in chunks[True][0].modules() if isinstance(m, GroupedExperts)]
        seq_params = dict(chunks[False][0].named_parameters())
        grp_params = dict(chunks[True][0].named_parameters())
        same_params = sorted(seq_params) == sorted(grp_params) and all(
            torch.equal(seq_params[n], grp_params[n]) for n in seq_params)
        exports = []
        for g in (False, True):  # each rank exports what it owns: the union over ranks is the model
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(
                shares, {k: v.clone() for k, v in export_policy_weights(chunks[g], hf_name_map(arch))})
            exports.append({k: v for share in shares for k, v in share.items()})
        seqs = sequences(arch.vocab_size)
        logits = [megatron_logits(chunks[g][0], seqs) for g in (False, True)]
        save_dir, back_dir = work / f"ckpt_{layout}", work / f"back_{layout}"
        save_checkpoint(save_dir, 1, chunks[True], hf_config=config)
        entry = {"grouped_modules": len(grouped_modules),
                 "stacked": all(m.weights_stacked() for m in grouped_modules), "same_params": same_params,
                 "logits_rel": _max_diff(logits[1], logits[0], relative=True)}
        del chunks, grouped_modules
        parallel_state.destroy_model_parallel()  # the exporter sets up its own (one-process) groups
        entry["export_rc"] = export(["--load", str(save_dir), "--save", str(back_dir), "--no-progress"])
        if rank == 0:
            back = read_tensors(back_dir)
            entry["export_sequential_exact"] = _same_tensors(exports[0], original)
            entry["export_grouped_exact"] = _same_tensors(exports[1], original)
            entry["round_trip_exact"] = _same_tensors(back, original)
            entry["num_tensors"] = len(original)
        results[layout] = entry
        parallel_state.destroy_model_parallel()
    return results


def _same_tensors(got: dict, want: dict) -> bool:
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="ep1", help="MoE-layer layouts, comma-separated.")
    parser.add_argument("--model-layouts", default="", help="GPTModel layouts (needs --work), comma-separated.")
    parser.add_argument("--work", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    if args.device == "cuda":  # one process: nothing is communicated (ep = tp = 1)
        torch.save(moe_case_cuda(), args.out)
        torch.distributed.destroy_process_group()
        return
    moe = {layout: moe_case(layout) for layout in args.layouts.split(",") if layout}
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, moe)
    layouts = [layout for layout in args.model_layouts.split(",") if layout]
    model = model_case(Path(args.work), layouts) if layouts else {}
    if torch.distributed.get_rank() == 0:
        torch.save({"moe": per_rank, "model": model}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
