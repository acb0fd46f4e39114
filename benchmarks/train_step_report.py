"""The markdown report of ``bench_train_step.py`` (the definitions are in its module docstring)."""

from __future__ import annotations

import platform
import shlex
import statistics
from datetime import date
from pathlib import Path

GiB = 1024**3


def environment_line(cuda: bool) -> str:
    import megatron.core
    import torch

    if cuda:
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return (f"{device}, torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
            f"Python {platform.python_version()}")


def write_report(out: Path, text: str) -> None:
    """Replace ``out`` atomically: never a half-written report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)


def resolved_attention(policy, backend: str, cuda: bool) -> str:
    """What ``auto`` means for this model here (models/attention.py's rule)."""
    if backend != "auto":
        return backend
    import torch

    from luspo_megatron.models.attention import varlen_supported

    arch, dtype = policy.arch, (torch.bfloat16 if policy.config.model.dtype == "bf16" else torch.float32)
    if cuda and dtype == torch.bfloat16:
        gqa = arch.num_attention_heads != arch.num_query_groups
        return "auto → " + ("varlen" if varlen_supported("cuda", dtype, arch.head_dim, gqa) else "causal")
    return "auto → padded"


def active_matmul_params(arch) -> int:
    """N_active of bench_train_step.py's docstring (the matmul parameters a token passes), from the architecture."""
    h = arch.hidden_size
    attention = h * (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    attention += arch.num_attention_heads * arch.head_dim * h
    total = arch.vocab_size * h  # output layer
    for layer in range(arch.num_layers):
        if arch.is_moe_layer(layer):
            mlp = h * arch.num_experts + arch.moe_router_topk * 3 * h * arch.moe_ffn_hidden_size
        else:
            mlp = 3 * h * arch.ffn_hidden_size
        total += attention + mlp
    return total


def mean_attended_keys(sequences) -> float:
    """c̄ = Σ L(L+1)/2 / Σ L over the batch (causal attention within each sequence)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def _flops_per_token(policy, sequences) -> tuple[float, int, float]:

    arch = policy.arch
    active = active_matmul_params(arch)
    c_bar = mean_attended_keys(sequences)
    return 6 * active + 12 * arch.num_layers * arch.num_attention_heads * arch.head_dim * c_bar, active, c_bar


def report(args, policy, sequences, micro_batches, results, cuda: bool, argv: list[str]) -> str:
    arch = policy.arch
    tokens = sum(int(mb.tokens.numel()) for mb in micro_batches)
    response_tokens = sum(int(mb.loss_mask.sum()) for mb in micro_batches)
    params = sum(p.numel() for chunk in policy.model for p in chunk.parameters())
    flops_per_token, active, c_bar = _flops_per_token(policy, sequences)
    command = "python benchmarks/bench_train_step.py " + " ".join(shlex.quote(a) for a in argv)
    peak = args.peak_tflops if args.dtype == "bf16" else None
    layers = getattr(args, "layers_note", str(arch.num_layers))
    lines = [
        "# Training-step throughput: experts × attention backend × loss, one model, one batch",
        "",
        f"Command: `{command.strip()}`",
        f"Device: {environment_line(cuda)}. Date: {date.today()}.",
        "",
        f"Model ({args.shape_name} shape): Qwen3-MoE, hidden {arch.hidden_size}, {layers} layers (all MoE), "
        f"{arch.num_experts} experts top-{arch.moe_router_topk}, expert FFN {arch.moe_ffn_hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads × {arch.head_dim}, vocab "
        f"{arch.vocab_size}; {args.dtype}; {params / 1e6:.1f} M parameters, {active / 1e6:.1f} M active matmul "
        f"weights per token. Transformer Engine: {'yes' if policy.use_transformer_engine else 'no (local spec)'}. "
        "Single device (tp = ep = pp = cp = 1).",
        "",
        f"Step: {tokens} packed tokens ({response_tokens} in the loss), {len(sequences)} sequences (mean length "
        f"{tokens / len(sequences):.0f}), {len(micro_batches)} micro-batches of ≤ {args.micro_batch_tokens} tokens; "
        f"LUSPO, lr 1e-6; {args.warmup} warm-up + {args.steps} timed steps per variant, the timed ones round-robin.",
        "",
        f"Model FLOPs per token = 6·N_active + 12·n_layers·n_heads·head_dim·c̄ = 6·{active:.4g} + "
        f"12·{arch.num_layers}·{arch.num_attention_heads}·{arch.head_dim}·{c_bar:.1f} = {flops_per_token:.4g} "
        "(N_active: matmul weights a token meets, top-k experts only; c̄: mean keys attended, causal; padding, "
        "recompute and the old-log-prob forward not counted). "
        + (f"MFU against {peak:g} TFLOP/s (dense bf16 peak of this chip)." if peak else
           "MFU: n/a (no bf16 peak for this device and dtype)."),
        "",
        _experts_line(policy, cuda),
        "",
        "| experts | attention | loss | timed steps | median step (s) | tokens/s | TFLOP/s (model) | MFU | "
        "peak memory (GiB) | loss, first step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for variant in args.variants:
        r = results[variant]
        experts, attention, loss = variant.split("/")
        if not r["times"]:
            lines.append(f"| {experts} | {attention} | {loss} | 0 | | | | | | |")
            continue
        median = medians[variant] = statistics.median(r["times"])
        tflops = tokens / median * flops_per_token / 1e12
        mfu = f"{100 * tflops / peak:.1f} %" if peak else "n/a"
        first = r["first"]["loss"] if r["first"] else float("nan")
        lines.append(f"| {experts} | {resolved_attention(policy, attention, cuda)} | {loss} | {len(r['times'])} | "
                     f"{median:.4f} | {tokens / median:,.0f} | {tflops:.3g} | {mfu} | {r['peak'] / GiB:.2f} | "
                     f"{first:.6g} |")
    lines += ["", *_ratios(medians), *_profile_table(args, results, cuda)]
    lines += ["", "Step times (s): " + "; ".join(f"{v} " + ", ".join(f"{t:.3f}" for t in results[v]["times"])
                                                 for v in args.variants if results[v]["times"]) + ". Peak memory: "
              + ("torch.cuda.max_memory_allocated over each variant's timed steps." if cuda else
                 "process peak RSS (ru_maxrss), including building the model; one process runs every variant."), ""]
    return "\n".join(lines)


def _experts_line(policy, cuda: bool) -> str:
    """How the grouped experts ran: the kernel or the loop fallback, and whether they read the weights in
    place (models/experts.py)."""
    import torch

    from luspo_megatron.models.experts import GroupedExperts, grouped_mm_op, kernel_supported

    modules = [m for chunk in policy.model for m in chunk.modules() if isinstance(m, GroupedExperts)]
    if not modules:
        return "Grouped experts: none in this model."
    dtype = torch.bfloat16 if policy.config.model.dtype == "bf16" else torch.float32
    kernel = kernel_supported("cuda" if cuda else "cpu", dtype)
    public = grouped_mm_op() is getattr(torch.nn.functional, "grouped_mm", None)
    name = "torch.nn.functional.grouped_mm" if public else "torch._grouped_mm"
    return (f"Grouped experts: {name} kernel in {dtype}" if kernel else
            f"Grouped experts: per-expert loop ({name} is not usable for {dtype} here)") + (
        "; weights read in place from the stacked buffers (no copy)"
        if all(m.weights_stacked() for m in modules) else "; weights stacked by copy at every GEMM") + "."


def _ratios(medians: dict[str, float]) -> list[str]:
    out = []
    for variant, median in medians.items():
        experts, attention, loss = variant.split("/")
        if experts == "grouped" and f"sequential/{attention}/{loss}" in medians:
            out.append(f"- grouped vs sequential experts ({attention} attention, {loss} loss): "
                       f"**{medians[f'sequential/{attention}/{loss}'] / median:.2f}×** faster step")
    base = "sequential/padded/fused"
    if base in medians:
        out += [f"- {v} vs {base} (the path before grouped experts and the new attention backends): "
                f"**{medians[base] / m:.2f}×**" for v, m in medians.items() if v != base]
    return (["Same-run step-time ratios (> 1: faster):", *out, ""]) if out else []


def _profile_table(args, results, cuda: bool) -> list[str]:
    from step_profile import CATEGORIES, LABELS

    rows = [(v, results[v]["profile"]) for v in args.variants if results[v]["profile"] is not None]
    if not rows:
        return []
    kind = "GPU kernel time" if cuda else "CPU time"
    lines = [f"Where one step's time goes (torch.profiler, one extra step per variant; {kind} per part, in ms "
             "and % of the summed time; benchmarks/step_profile.py):", "",
             "| variant | step wall (s) | summed time (s) | " + " | ".join(LABELS[c] for c in CATEGORIES) + " |",
             "|---|---:|---:|" + "---:|" * len(CATEGORIES)]
    for variant, profile in rows:
        if isinstance(profile, str):
            lines.append(f"| {variant} | {profile} |")
            continue
        parts, wall = profile
        total = sum(parts.values()) or 1.0
        cells = " | ".join(f"{1000 * parts[c]:.1f} ({100 * parts[c] / total:.0f} %)" for c in CATEGORIES)
        lines.append(f"| {variant} | {wall:.3f} | {sum(parts.values()):.3f} | {cells} |")
    return lines
