"""Worker (torchrun): one LUSPO training step of a tiny Qwen3-MoE under several layouts.

``--reference`` (1 process): run the step on the whole batch and save the loss, grad norm, every
full parameter and gradient after the step (global names), and the forward-only log-probs.
Otherwise, for each ``--layouts`` entry (same processes, groups rebuilt in between): load the
same explicit weights, take this DP rank's micro-batches, run the same step through the
production path (wrap_model, build_optimizer, compute_logprobs, train_step) and compare every
local shard with the matching slice of the reference. Rank 0 saves the worst errors per layout.

Layout names: tp2 ep2 pp2 pp2vpp2 cp2 dp2do (distributed optimizer) tp2ep2 tp2pp2 pp2ep2 ep4;
a "-broken" suffix drops the TP all-reduce of the log-prob (negative control).
"""

import argparse
import re

import torch
import torch.distributed as dist

CONFIG = {"vocab_size": 256}
NUM_MICRO_BATCHES = 4
LENGTHS = [[12, 20], [16, 8], [24, 12], [8, 28]]  # multiples of 4: no CP/TP padding, same as 1 process
NOISE = 0.01  # old_logp = logp + N(0, NOISE²): ratios straddle LUSPO's clip range
# Adam's first step is lr·g/(|g| + ε): with ε = 1e-8 a gradient entry of ~1e-9 turns fp32 noise
# into an O(lr) change. ε = 1e-6 keeps such entries linear, so the comparison tests our gradients,
# not Adam's conditioning (with ε = 1e-8 tp2 still agrees to 8e-6).
OPTIMIZER = {"lr": 1e-3, "lr_warmup_iters": 0, "weight_decay": 0.01, "clip_grad": 1.0, "adam_eps": 1e-6}


def parse_layout(name: str) -> dict:
    sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|vpp|cp|ep|dp)(\d+)", name.replace("-broken", ""))}
    return {
        "tensor_model_parallel_size": sizes.get("tp", 1), "pipeline_model_parallel_size": sizes.get("pp", 1),
        "virtual_pipeline_model_parallel_size": sizes.get("vpp"), "context_parallel_size": sizes.get("cp", 1),
        "expert_model_parallel_size": sizes.get("ep", 1), "use_distributed_optimizer": name.endswith("do"),
    }


def global_batch():
    """The step's packed micro-batches, token-aligned, built from a fixed seed."""
    from luspo_megatron.data.packing import MicroBatch

    gen = torch.Generator().manual_seed(11)
    batches = []
    for lengths in LENGTHS:
        total = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        mask = torch.zeros(total)
        for start, length in zip(cu[:-1].tolist(), lengths):
            mask[start + length // 3: start + length] = 1.0  # the last 2/3 of each sequence: response
        experts = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(4 * total)]).view(4, total, 2)
        batches.append(MicroBatch(
            tokens=torch.randint(0, CONFIG["vocab_size"], (total,), generator=gen), cu_seqlens=cu, loss_mask=mask,
            advantages=torch.randn(len(lengths), generator=gen), routed_experts=experts,
        ))
    noise = [torch.randn(sum(lengths), generator=gen) * NOISE for lengths in LENGTHS]
    return batches, noise


def _capture_routing(chunks):
    """Forward hooks recording every router's routing map; removed after the first use."""
    seen, hooks = [], []
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                hooks.append(router.register_forward_hook(lambda mod, args, out: seen.append(out[1].clone())))
    return seen, hooks


def _routing_matches(routing, batches) -> bool:
    """One process, no padding: the routing used must be exactly the replayed expert indices."""
    seen, hooks = routing
    for hook in hooks:
        hook.remove()
    layers = batches[0].routed_experts.shape[0]
    expected = [torch.zeros(mb.tokens.numel(), 8, dtype=torch.bool).scatter(1, mb.routed_experts[layer], True)
                for mb in batches for layer in range(layers)]
    return len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def run_layout(name: str, reference: dict | None):
    from luspo_megatron.algorithms.losses import LossConfig
    from luspo_megatron.config import OptimizerConfig, ParallelConfig
    from luspo_megatron.models import arch_from_hf, tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_live_to_disk, hf_name_map
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import load_hf_weights, local_params
    from luspo_megatron.parallel import train
    from luspo_megatron.parallel.export import export_policy_weights
    from luspo_megatron.parallel.state import init_parallel
    from tests.hf_models import build_hf_model

    layout = parse_layout(name)
    use_distopt = layout.pop("use_distributed_optimizer")
    parallel = ParallelConfig(**layout, use_distributed_optimizer=use_distopt)
    hf_config = tiny_qwen3_moe(**CONFIG)
    arch = arch_from_hf(hf_config)
    state = init_parallel(parallel, arch, seed=5)
    config = transformer_config(arch, parallel, routing_replay=True)
    chunks = build_model(arch, config, use_transformer_engine=False)
    hf_weights = hf_live_to_disk(build_hf_model(hf_config, seed=3).state_dict())
    load_hf_weights(chunks, arch, hf_weights)
    # Sharded, then exported back: the ranks' own shares together are the HF weights, each tensor once.
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, {k: v.clone() for k, v in export_policy_weights(chunks, hf_name_map(arch))})
    exported = {k: v for share in shares for k, v in share.items()}
    export_exact = (sum(map(len, shares)) == len(exported) and exported.keys() == hf_weights.keys()
                    and all(torch.equal(exported[k], v) for k, v in hf_weights.items()))
    model = train.wrap_model(chunks, config, use_distributed_optimizer=use_distopt)
    optimizer, scheduler = train.build_optimizer(
        model, OptimizerConfig(**OPTIMIZER), total_steps=4,
        use_distributed_optimizer=use_distopt)
    batches, noise = global_batch()
    mine = list(range(NUM_MICRO_BATCHES))[state.dp_rank::state.dp]
    batches = [batches[i] for i in mine]
    old = train.compute_logprobs(model, batches)
    routing = _capture_routing(chunks) if reference is None else None
    replayed = train.compute_logprobs(model, batches, routing_replay=True)
    replay_matches = _routing_matches(routing, batches) if reference is None else None
    for i, mb, logp in zip(mine, batches, old):
        mb.old_logp = logp + noise[i]
    if name.endswith("-broken"):
        groups = train._groups
        train._groups = lambda: (None, groups()[1])  # negative control: no TP all-reduce in the log-prob
    try:
        metrics = train.train_step(model, optimizer, scheduler, batches, LossConfig(name="luspo"))
    finally:
        if name.endswith("-broken"):
            train._groups = groups
    if reference is None:
        full = {lp.global_name: (lp.param.detach().clone(), lp.param.main_grad.detach().clone())
                for lp in local_params(chunks)}
        return {"metrics": metrics, "old": old, "replayed": replayed, "params": full,
                "replay_routing_matches": replay_matches}

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))

    errors = torch.zeros(4, dtype=torch.float64)  # param, grad, logp, replayed logp
    for lp in local_params(chunks):
        ref_param, ref_grad = reference["params"][lp.global_name]
        errors[0] = max(errors[0], rel(lp.param.detach(), lp.shard(ref_param)))
        if not use_distopt:  # the distributed optimizer keeps only its own shard of main_grad
            errors[1] = max(errors[1], rel(lp.param.main_grad, lp.shard(ref_grad)))
    for i, logp, rep in zip(mine, old, replayed):
        errors[2] = max(errors[2], float((logp - reference["old"][i]).abs().max()))
        errors[3] = max(errors[3], float((rep - reference["replayed"][i]).abs().max()))
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    ref_metrics = reference["metrics"]
    return {
        "loss_rel": abs(metrics["loss"] - ref_metrics["loss"]) / abs(ref_metrics["loss"]),
        "grad_norm_rel": abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"],
        "param_rel": float(errors[0]), "grad_rel": float(errors[1]) if not use_distopt else None,
        "logp_abs": float(errors[2]), "replayed_logp_abs": float(errors[3]),
        "clip_frac": metrics["clip_frac"], "ref_clip_frac": ref_metrics["clip_frac"],
        "num_seqs": metrics["num_seqs"], "num_tokens": metrics["num_tokens"],
        "ref_num_tokens": ref_metrics["num_tokens"], "export_exact": export_exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference-file")
    parser.add_argument("--layouts", default="")
    args = parser.parse_args()
    if not args.layouts:
        result = run_layout("reference", None)
        result["replay_differs"] = max(float((a - b).abs().max()) for a, b in zip(result["old"], result["replayed"]))
    else:
        reference = torch.load(args.reference_file, weights_only=False)
        result = {}
        for name in args.layouts.split(","):
            result[name] = run_layout(name, reference)
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
