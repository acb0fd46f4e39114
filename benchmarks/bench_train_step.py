"""Throughput of one RL training step of the Megatron-Core Qwen3-MoE policy, fused vs reference loss.

What one step is: ``MegatronPolicy.train_step`` on a packed batch, i.e. Megatron's schedule over the
micro-batches (forward, chunked vocab-parallel log-probs + entropy, the LUSPO loss, backward), then the
optimizer step (grad norm, clip, AdamW) and the LR schedule. Single device, tp = ep = pp = cp = 1, world
size 1 (torch.distributed is initialised here when not launched by torchrun: NCCL on CUDA, gloo on CPU).
The model is built exactly as the trainer builds it (``MegatronPolicy.from_config`` on a Qwen3-MoE
``config.json`` written to a temporary directory, weights from the transformers initialiser).

Batch: random token ids; sequences of random length (0.5–1.5 × ``--seq-len``, 20 % prompt, the loss mask
on the response), packed into micro-batches of at most ``--micro-batch-tokens`` by the trainer's own
``data.packing.pack_micro_batches``; GRPO group advantages of random 0/1 rewards (groups of 8). The old
log-probs are the policy's own (one ``compute_logprobs`` forward of the same batch before timing) plus
small per-token noise (``--old-logp-noise``), so ratios are ≈ 1 and some sequences clip, as in training.

Ablation, in the same process on the same model and batch: the loss through the csrc extension
(``ops.backend()``: "cuda" on a GPU, "cpp" on a CPU) vs the pure-PyTorch reference
(``LUSPO_FORCE_REFERENCE=1``, read at every call). Each variant first runs ``--warmup`` untimed steps,
then the timed steps alternate between the two variants, so drift (clocks, allocator) hits both alike.
Every step changes the weights (lr 1e-6, no warm-up), as in training.

Reported per variant: median step time, tokens/s (all packed tokens, prompt included), the model FLOPs
per token and the implied TFLOP/s, peak memory (``torch.cuda.max_memory_allocated`` over the timed
steps on a GPU; the process's peak RSS ``ru_maxrss`` on a CPU, which includes building the model) and
the loss of the variant's first step. Model FLOPs per token (fwd + bwd = 3 × fwd, 2 FLOPs per
multiply-add):

    6 · N_active + 12 · n_layers · n_heads · head_dim · c̄

    N_active = the matmul weights one token meets: per layer q, k, v, o projections, the router
               (H · E) and top-k of the experts' SwiGLU (3 · H · F_moe each) — or the dense MLP — plus
               the output layer (H · V); the embedding lookup is not a matmul.
    c̄        = mean number of keys a token attends to (causal, within its sequence) = Σ L(L+1)/2 / Σ L.

These are useful model FLOPs (as in MFU): the padded attention and the log-prob recompute are not
counted.

    python benchmarks/bench_train_step.py --out docs/bench/train_step.md   # GPU: a 0.76 B-param MoE
    python benchmarks/bench_train_step.py --quick                          # tiny model: CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3
GROUP_SIZE = 8  # responses per prompt (GRPO groups)
PROMPT_FRACTION = 0.2
SEED = 1234
VARIANTS = ("fused", "reference")

# The GPU default: a mid-size Qwen3-MoE (0.76 B parameters, 0.25 B active matmul weights per token) that fits one
# 80 GB GPU with bf16 weights, fp32 main weights, fp32 grads and Adam moments (≈ 18 bytes / parameter).
DEFAULT = dict(hidden=1024, layers=8, experts=32, topk=4, moe_ffn=512, heads=16, kv_heads=4, head_dim=128,
               vocab=151936, tokens_per_step=16384, seq_len=1024, micro_batch_tokens=8192, steps=5, warmup=2)
QUICK = dict(hidden=64, layers=2, experts=8, topk=2, moe_ffn=32, heads=4, kv_heads=2, head_dim=32,
             vocab=2048, tokens_per_step=1024, seq_len=64, micro_batch_tokens=512, steps=2, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny model, few tokens: a smoke run (CPU, < 1 min).")
    p.add_argument("--hidden", type=int, help=f"Hidden size (default {DEFAULT['hidden']}).")
    p.add_argument("--layers", type=int, help=f"Decoder layers, all MoE (default {DEFAULT['layers']}).")
    p.add_argument("--experts", type=int, help=f"Experts per MoE layer (default {DEFAULT['experts']}).")
    p.add_argument("--topk", type=int, help=f"Experts per token (default {DEFAULT['topk']}).")
    p.add_argument("--moe-ffn", type=int, help=f"Expert intermediate size (default {DEFAULT['moe_ffn']}).")
    p.add_argument("--heads", type=int, help=f"Attention heads (default {DEFAULT['heads']}).")
    p.add_argument("--kv-heads", type=int, help=f"Key/value heads, GQA (default {DEFAULT['kv_heads']}).")
    p.add_argument("--head-dim", type=int, help=f"Head dimension, explicit as Qwen3's (default {DEFAULT['head_dim']}).")
    p.add_argument("--vocab", type=int, help=f"Vocabulary size (default {DEFAULT['vocab']}, Qwen3's).")
    p.add_argument("--tokens-per-step", type=int, help="Packed tokens per optimizer step "
                   f"(default {DEFAULT['tokens_per_step']}).")
    p.add_argument("--seq-len", type=int, help=f"Mean sequence length (default {DEFAULT['seq_len']}).")
    p.add_argument("--micro-batch-tokens", type=int, help="Token budget of a packed micro-batch "
                   f"(default {DEFAULT['micro_batch_tokens']}).")
    p.add_argument("--steps", type=int, help=f"Timed steps per variant (default {DEFAULT['steps']}).")
    p.add_argument("--warmup", type=int, help=f"Untimed steps per variant first (default {DEFAULT['warmup']}).")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="Parameter dtype (default bf16 on CUDA, fp32 on CPU).")
    p.add_argument("--old-logp-noise", type=float, default=0.05,
                   help="Std of the per-token noise added to the policy's own log-probs to make old_logp.")
    p.add_argument("--out", help="Also write the markdown report to this file.")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in base:
        if getattr(args, key) < (0 if key == "warmup" else 1):
            p.error(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(args, key)}")
    if args.topk > args.experts:
        p.error(f"--topk: expected ≤ --experts ({args.experts}), got {args.topk}")
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")
    if max_seq_len(args.seq_len) > args.micro_batch_tokens:
        p.error(f"--micro-batch-tokens: expected ≥ the longest sequence (1.5 × --seq-len = "
                f"{max_seq_len(args.seq_len)}), got {args.micro_batch_tokens}")
    if args.old_logp_noise < 0:
        p.error(f"--old-logp-noise: expected ≥ 0, got {args.old_logp_noise}")
    return args


def max_seq_len(seq_len: int) -> int:
    return max(2, (3 * seq_len) // 2)


# --------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """torchrun's variables for a world of one, unless a launcher set them (``init_parallel`` reads them)."""
    # Megatron asks for one CUDA work queue so that communication kernels are issued in program order
    # (it asserts it for TP/SP overlap); harmless here, and must be set before CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


# -------------------------------------------------------------------------------------------- model
def hf_config_of_args(args: argparse.Namespace) -> dict:
    from luspo_megatron.models.arch import tiny_qwen3_moe

    return tiny_qwen3_moe(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate_size=4 * args.moe_ffn,  # dense MLP size; unused, every layer is MoE
        moe_intermediate_size=args.moe_ffn, num_experts=args.experts, num_experts_per_tok=args.topk,
        max_position_embeddings=max(4096, max_seq_len(args.seq_len)),
    )


def build_policy(args: argparse.Namespace, hf_config: dict, model_dir: str, max_response_len: int):
    """The trainer's path: a RunConfig whose ``--hf-checkpoint`` is a directory with the config.json,
    weights from the transformers initialiser under the run seed (``initial_hf_state_dict``)."""
    from luspo_megatron.config import config_from_dict
    from luspo_megatron.models.initial import initial_hf_state_dict
    from luspo_megatron.parallel.policy import MegatronPolicy

    Path(model_dir, "config.json").write_text(json.dumps(hf_config, indent=1))
    config = config_from_dict({
        "seed": SEED,
        "model": {"hf_checkpoint": model_dir, "dtype": args.dtype},
        "rollout": {"max_response_len": max_response_len},
        "algorithm": {"loss": "luspo", "n_samples_per_prompt": GROUP_SIZE},
        "optimizer": {"lr": 1e-6, "lr_warmup_iters": 0, "max_tokens_per_micro_batch": args.micro_batch_tokens},
    }, source="bench_train_step")
    total_steps = len(VARIANTS) * (args.warmup + args.steps)
    weights = initial_hf_state_dict(hf_config, SEED)
    return MegatronPolicy.from_config(config, total_steps=total_steps, hf_weights=weights)


def active_matmul_params(arch) -> int:
    """N_active of the module docstring, from the architecture."""
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


# -------------------------------------------------------------------------------------------- batch
def make_batch(args: argparse.Namespace):
    """Sequences (prompt ids, response ids) of exactly ``--tokens-per-step`` tokens in all, their count
    a multiple of the group size, and their group advantages. Returns (sequences, advantages)."""
    import torch

    from luspo_megatron.algorithms.advantages import group_advantages

    gen = torch.Generator().manual_seed(SEED)
    count = max(1, round(args.tokens_per_step / args.seq_len / GROUP_SIZE)) * GROUP_SIZE
    longest = max_seq_len(args.seq_len)
    if count * 2 > args.tokens_per_step or count * longest < args.tokens_per_step:
        raise ValueError(f"--tokens-per-step {args.tokens_per_step} cannot be cut into {count} sequences of "
                         f"2 to {longest} tokens (--seq-len {args.seq_len})")
    weights = 0.5 + torch.rand(count, generator=gen, dtype=torch.float64)  # 0.5–1.5 × mean
    lengths = (weights / weights.sum() * args.tokens_per_step).floor().long().clamp(2, longest)
    while int(lengths.sum()) != args.tokens_per_step:  # exactly the asked total: ±1 on the shortest / longest
        if int(lengths.sum()) < args.tokens_per_step:
            lengths[int(lengths.argmin())] += 1
        else:
            lengths[int(lengths.argmax())] -= 1
    sequences = []
    for length in lengths.tolist():
        prompt = max(1, round(PROMPT_FRACTION * length))
        ids = torch.randint(0, args.vocab, (length,), generator=gen).tolist()
        sequences.append(SimpleNamespace(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                                         rollout_logp=[0.0] * (length - prompt)))
    rewards = torch.randint(0, 2, (count,), generator=gen).to(torch.float64)
    return sequences, group_advantages(rewards, GROUP_SIZE).float()


def pack(args: argparse.Namespace, sequences, advantages):
    """The trainer's packing (first-fit decreasing under the token budget), as parallel.MicroBatch."""
    from luspo_megatron.data.packing import MicroBatch, pack_micro_batches

    (packed,) = pack_micro_batches(sequences, advantages, max_tokens_per_micro_batch=args.micro_batch_tokens)
    return [MicroBatch(tokens=mb.tokens, cu_seqlens=mb.cu_seqlens, loss_mask=mb.loss_mask,
                       advantages=mb.advantages) for mb in packed]


def set_old_logprobs(policy, micro_batches, noise: float) -> None:
    """old_logp = the policy's own log-probs + N(0, noise²) on response tokens (ratios ≈ 1, some clip)."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    for mb, logp in zip(micro_batches, policy.compute_logprobs(micro_batches)):
        if not bool(torch.isfinite(logp).all()):
            raise RuntimeError("compute_logprobs returned non-finite log-probs")
        mb.old_logp = logp + noise * torch.randn(logp.shape, generator=gen) * mb.loss_mask


def mean_attended_keys(sequences) -> float:
    """c̄ = Σ L(L+1)/2 / Σ L over the batch (causal attention within each sequence)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


# ------------------------------------------------------------------------------------------- timing
def check_backend(variant: str, cuda: bool) -> None:
    """The loss backend ``policy_loss`` will use must be the one the variant names: without the csrc
    extension (or its CUDA kernels) both rows would silently time the reference."""
    from luspo_megatron.ops import backend

    expected = "reference" if variant == "reference" else ("cuda" if cuda else "cpp")
    if backend() != expected:
        raise RuntimeError(f"{variant} variant: the loss backend is {backend()!r}, expected {expected!r} (build "
                           "luspo_megatron._C for this Python and device: pip install --no-build-isolation -e .)")


def run_variant_step(policy, micro_batches, variant: str, cuda: bool) -> tuple[float, dict, int]:
    """One train step with the loss backend of ``variant``: (seconds, metrics, peak bytes)."""
    import torch

    from luspo_megatron.ops._extension import FORCE_REFERENCE_ENV

    if variant == "reference":
        os.environ[FORCE_REFERENCE_ENV] = "1"
    else:
        os.environ.pop(FORCE_REFERENCE_ENV, None)
    try:
        check_backend(variant, cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = policy.train_step(micro_batches)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        os.environ.pop(FORCE_REFERENCE_ENV, None)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    loss = metrics.get("loss", float("nan"))
    if metrics.get("skipped", 0.0) or loss != loss or abs(loss) == float("inf"):
        raise RuntimeError(f"{variant} step: non-finite loss or gradient (loss {loss}, "
                           f"grad_norm {metrics.get('grad_norm')}, skipped {metrics.get('skipped')})")
    return seconds, metrics, peak


def benchmark(policy, micro_batches, args: argparse.Namespace, cuda: bool) -> dict[str, dict]:
    results = {v: {"times": [], "peak": 0, "first": None} for v in VARIANTS}
    for i in range(args.warmup):  # alternating too, so both variants' first steps see nearly the same weights
        for variant in VARIANTS:
            seconds, metrics, _ = run_variant_step(policy, micro_batches, variant, cuda)
            print(f"  warm-up {variant} {i + 1}/{args.warmup}: {seconds:.3f} s  loss {metrics['loss']:.6g}",
                  flush=True)
            if results[variant]["first"] is None:
                results[variant]["first"] = metrics
    for i in range(args.steps):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            seconds, metrics, peak = run_variant_step(policy, micro_batches, variant, cuda)
            r = results[variant]
            r["times"].append(seconds)
            r["peak"] = max(r["peak"], peak)
            if r["first"] is None:
                r["first"] = metrics
            print(f"  step {i + 1}/{args.steps} {variant}: {seconds:.3f} s  loss {metrics['loss']:.6g}", flush=True)
    return results


# ------------------------------------------------------------------------------------------- report
def environment_line(cuda: bool) -> str:
    import megatron.core
    import torch

    if cuda:
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return (f"{device}, torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
            f"Python {platform.python_version()}")


def report(args, policy, sequences, micro_batches, results, cuda: bool, argv: list[str]) -> str:
    arch = policy.arch
    tokens = sum(int(mb.tokens.numel()) for mb in micro_batches)
    response_tokens = sum(int(mb.loss_mask.sum()) for mb in micro_batches)
    params = sum(p.numel() for chunk in policy.model for p in chunk.parameters())
    active = active_matmul_params(arch)
    c_bar = mean_attended_keys(sequences)
    flops_per_token = 6 * active + 12 * arch.num_layers * arch.num_attention_heads * arch.head_dim * c_bar
    fused_backend = "cuda" if cuda else "cpp"
    command = "python benchmarks/bench_train_step.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# Training-step throughput: MegatronPolicy.train_step, fused vs reference LUSPO loss",
        "",
        f"Command: `{command.strip()}`",
        f"Device: {environment_line(cuda)}. Date: {date.today()}.",
        "",
        f"Model: Qwen3-MoE, hidden {arch.hidden_size}, {arch.num_layers} layers (all MoE), {arch.num_experts} "
        f"experts top-{arch.moe_router_topk}, expert FFN {arch.moe_ffn_hidden_size}, {arch.num_attention_heads} "
        f"heads / {arch.num_query_groups} KV heads × {arch.head_dim}, vocab {arch.vocab_size}; {args.dtype}; "
        f"{params / 1e6:.1f} M parameters, {active / 1e6:.1f} M active matmul weights per token. "
        f"Transformer Engine: {'yes' if policy.use_transformer_engine else 'no (local spec)'}. "
        "Single device (tp = ep = pp = cp = 1).",
        "",
        f"Step: {tokens} packed tokens ({response_tokens} in the loss), {len(sequences)} sequences "
        f"(mean length {tokens / len(sequences):.0f}), {len(micro_batches)} micro-batches of ≤ "
        f"{args.micro_batch_tokens} tokens; LUSPO, lr 1e-6; {args.warmup} warm-up + {args.steps} timed steps "
        "per variant, the timed ones alternating.",
        "",
        f"Model FLOPs per token = 6·N_active + 12·n_layers·n_heads·head_dim·c̄ = 6·{active:.4g} + "
        f"12·{arch.num_layers}·{arch.num_attention_heads}·{arch.head_dim}·{c_bar:.1f} = {flops_per_token:.4g} "
        "(c̄: mean keys attended per token, causal; padded attention and log-prob recompute not counted).",
        "",
        "| loss | backend | median step (s) | tokens/s | TFLOP/s (model) | peak memory (GiB) | loss, first step "
        "| clip fraction, first step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for variant in VARIANTS:
        r = results[variant]
        median = statistics.median(r["times"])
        medians[variant] = median
        tps = tokens / median
        first = r["first"]
        lines.append(
            f"| {variant} | {fused_backend if variant == 'fused' else 'reference'} | {median:.4f} | {tps:,.0f} | "
            f"{tps * flops_per_token / 1e12:.3g} | {r['peak'] / GiB:.2f} | {first['loss']:.6g} | "
            f"{first.get('clip_frac', float('nan')):.3f} |"
        )
    ratio = medians["reference"] / medians["fused"]
    memory = ("peak memory: torch.cuda.max_memory_allocated over each variant's timed steps" if cuda
              else "peak memory: process peak RSS (ru_maxrss), including building the model; the same "
                   "process runs both variants")
    lines += [
        "",
        f"Step-time ratio reference / fused (same run): **{ratio:.3f}×** "
        f"(> 1: the fused loss makes the step faster). Step times: "
        + "; ".join(f"{v} " + ", ".join(f"{t:.3f}" for t in results[v]["times"]) + " s" for v in VARIANTS)
        + f". {memory}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    set_single_process_env()
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    from luspo_megatron.parallel.policy import resolve_transformer_engine

    te = resolve_transformer_engine(False)
    print(f"bench_train_step: {environment_line(cuda)}; transformer engine: {te}", flush=True)
    if os.environ.get("LUSPO_FORCE_REFERENCE") == "1":
        raise RuntimeError("unset LUSPO_FORCE_REFERENCE: the benchmark sets it itself for the reference variant")
    check_backend("fused", cuda)  # fail before the (slow) model build

    hf_config = hf_config_of_args(args)
    sequences, advantages = make_batch(args)
    max_response = max(len(s.response_ids) for s in sequences)
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        policy = build_policy(args, hf_config, model_dir, max_response)
        print(f"  model built in {time.perf_counter() - start:.1f} s", flush=True)
    if cuda:
        device = next(p.device for chunk in policy.model for p in chunk.parameters())
        if device.type != "cuda":
            raise RuntimeError(f"the model's parameters are on {device}, expected cuda")
    micro_batches = pack(args, sequences, advantages)
    set_old_logprobs(policy, micro_batches, args.old_logp_noise)
    results = benchmark(policy, micro_batches, args, cuda)
    text = report(args, policy, sequences, micro_batches, results, cuda, argv)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)  # never a half-written report
        print(f"wrote {out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
