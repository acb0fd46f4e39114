"""Throughput of one RL training step of the Megatron-Core Qwen3-MoE policy, per variant of experts,
attention backend and loss, in one run on one model and batch.

What one step is: ``MegatronPolicy.train_step`` on a packed batch, i.e. Megatron's schedule over the
micro-batches (forward, chunked vocab-parallel log-probs + entropy, the LUSPO loss, backward), then the
optimizer step (grad norm, clip, AdamW) and the LR schedule. Single device, tp = ep = pp = cp = 1, world
size 1 (torch.distributed is initialised here when not launched by torchrun: NCCL on CUDA, gloo on CPU).
The model is built as the trainer builds it (``MegatronPolicy.from_config`` on a Qwen3-MoE ``config.json``
written to a temporary directory, the local spec with ``--moe-grouped-gemm``); its weights are drawn like
the transformers initialiser (N(0, 0.02), norms 1), tensor by tensor on the device, so that a 30B-shaped
model needs neither a host copy nor minutes of CPU initialisation.

Shapes: the default is a mid-size Qwen3-MoE (hidden 1024, 8 layers, 32 experts top-4, expert FFN 512,
16 / 4 heads of 128; 0.76 B parameters); ``--shape qwen3_30b_a3b`` is Qwen3-30B-A3B's layer (hidden 2048,
32 query / 4 KV heads of 128, 128 experts top-8, expert FFN 768, vocab 151,936) with ``--layers N`` of
its 48 layers, by default as many as fit this GPU (18 bytes per parameter: bf16 weight, fp32 gradient,
fp32 main weight and two Adam moments, within 65 % of its memory); ``--quick`` is a tiny CPU smoke run.

Variants (``--variants``, ``experts/attention/loss``), switched at run time on the same model:
experts ``grouped`` (models/experts.py, torch grouped_mm) or ``sequential`` (megatron's SequentialMLP, the
same parameters); attention backend ``auto|padded|causal|varlen|reference`` (models/attention.py); loss
through the csrc extension (``fused``) or the pure-PyTorch ``reference``. Each variant first runs
``--warmup`` untimed steps, then the timed steps go round-robin over the variants (reversed every other
round), so drift hits all alike. Every step changes the weights (lr 1e-6, no warm-up), as in training.

Batch: random token ids; sequences of random length (0.5–1.5 × ``--seq-len``, 20 % prompt, the loss mask
on the response), packed into micro-batches of at most ``--micro-batch-tokens`` by the trainer's
``data.packing.pack_micro_batches``; GRPO group advantages of random 0/1 rewards (groups of 8). old_logp is
the policy's own log-probs plus N(0, ``--old-logp-noise``²) per token, so ratios are ≈ 1 and some clip.

Reported per variant: median step time, tokens/s (all packed tokens, prompt included), model TFLOP/s,
MFU = model TFLOP/s / the chip's dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s; ``--peak-tflops``
otherwise), peak memory (``torch.cuda.max_memory_allocated`` over the variant's timed steps; on a CPU the
process's peak RSS) and the first step's loss. Model FLOPs per token (fwd + bwd = 3 × fwd, 2 FLOPs per
multiply-add):

    6 · N_active + 12 · n_layers · n_heads · head_dim · c̄

    N_active = the matmul weights one token meets: per layer q, k, v, o projections, the router (H · E)
               and top-k of the experts' SwiGLU (3 · H · F_moe each), plus the output layer (H · V); the
               embedding lookup is not a matmul.
    c̄        = mean number of keys a token attends to (causal, within its sequence) = Σ L(L+1)/2 / Σ L.

These are useful model FLOPs (as in MFU): padding, recomputation and the old-log-prob forward are not
counted. Then one extra step per variant under torch.profiler (``--no-profile`` skips it), its time split
into experts, attention, router/dispatch, log-probs + loss, optimizer and other (``step_profile.py``).
The report file is rewritten after every timed round and every profiled variant: a run that stops early
leaves what it measured.

    python benchmarks/bench_train_step.py --shape qwen3_30b_a3b --out docs/bench/train_step_30b_gpu.md
    python benchmarks/bench_train_step.py --out docs/bench/train_step_gpu.md       # GPU, the 0.76 B MoE
    python benchmarks/bench_train_step.py --quick                                  # tiny model: CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step_report import report, write_report  # noqa: E402

GiB = 1024**3
GROUP_SIZE = 8  # responses per prompt (GRPO groups)
PROMPT_FRACTION = 0.2
SEED = 1234
BYTES_PER_PARAM = 18  # bf16 weight 2 + fp32 grad 4 + fp32 main weight 4 + Adam moments 8
MEMORY_FRACTION = 0.65  # of the GPU for the 18 bytes/parameter; the rest: activations, log-prob chunks

SHAPES = {
    "default": dict(hidden=1024, layers=8, experts=32, topk=4, moe_ffn=512, heads=16, kv_heads=4, head_dim=128,
                    vocab=151936, tokens_per_step=16384, seq_len=1024, micro_batch_tokens=8192, steps=5, warmup=2),
    "qwen3_30b_a3b": dict(hidden=2048, layers=None, experts=128, topk=8, moe_ffn=768, heads=32, kv_heads=4,
                          head_dim=128, vocab=151936, tokens_per_step=16384, seq_len=1024,
                          micro_batch_tokens=8192, steps=3, warmup=1),
    "quick": dict(hidden=64, layers=2, experts=8, topk=2, moe_ffn=32, heads=4, kv_heads=2, head_dim=32,
                  vocab=2048, tokens_per_step=1024, seq_len=64, micro_batch_tokens=512, steps=3, warmup=1),
}
EXPERTS = ("grouped", "sequential")
ATTENTION = ("auto", "padded", "causal", "varlen", "reference")
LOSSES = ("fused", "reference")
GPU_VARIANTS = ("sequential/padded/fused", "sequential/auto/fused", "grouped/padded/fused", "grouped/causal/fused",
                "grouped/varlen/fused", "grouped/auto/reference")
CPU_VARIANTS = ("sequential/padded/fused", "grouped/padded/fused", "grouped/causal/fused",
                "grouped/padded/reference")
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, vendor datasheets (SXM)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny model, few tokens: a smoke run (CPU, < 1 min).")
    p.add_argument("--shape", choices=("default", "qwen3_30b_a3b"), default="default",
                   help="Model preset (see the module docstring); the flags below override its fields.")
    for key, text in (("hidden", "Hidden size"), ("layers", "Decoder layers, all MoE (30B shape: as many as fit)"),
                      ("experts", "Experts per MoE layer"), ("topk", "Experts per token"),
                      ("moe_ffn", "Expert intermediate size"), ("heads", "Attention heads"),
                      ("kv_heads", "Key/value heads (GQA)"), ("head_dim", "Head dimension"),
                      ("vocab", "Vocabulary size"), ("tokens_per_step", "Packed tokens per optimizer step"),
                      ("seq_len", "Mean sequence length"), ("micro_batch_tokens", "Token budget of a micro-batch"),
                      ("steps", "Timed steps per variant"), ("warmup", "Untimed steps per variant first")):
        p.add_argument("--" + key.replace("_", "-"), type=int, help=text + ".")
    p.add_argument("--variants", help="Comma-separated experts/attention/loss, e.g. grouped/varlen/fused "
                   f"(default on CUDA: {','.join(GPU_VARIANTS)}; on a CPU: {','.join(CPU_VARIANTS)}).")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="Parameter dtype (default bf16 on CUDA, fp32 on CPU).")
    p.add_argument("--peak-tflops", type=float, help="The chip's dense bf16 peak for MFU (default: by GPU name).")
    p.add_argument("--no-profile", action="store_true", help="Skip the profiled step per variant.")
    p.add_argument("--old-logp-noise", type=float, default=0.05,
                   help="Std of the per-token noise added to the policy's own log-probs to make old_logp.")
    p.add_argument("--out", help="Also write the markdown report to this file (rewritten as results come in).")
    args = p.parse_args(argv)
    base = SHAPES["quick" if args.quick else args.shape]
    args.shape_name = "quick" if args.quick else args.shape
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in base:
        value = getattr(args, key)
        if value is not None and value < (0 if key == "warmup" else 1):
            p.error(f"--{key.replace('_', '-')}: expected a positive integer, got {value}")
    if args.topk > args.experts:
        p.error(f"--topk: expected ≤ --experts ({args.experts}), got {args.topk}")
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")
    if max_seq_len(args.seq_len) > args.micro_batch_tokens:
        p.error(f"--micro-batch-tokens: expected ≥ the longest sequence (1.5 × --seq-len = "
                f"{max_seq_len(args.seq_len)}), got {args.micro_batch_tokens}")
    if args.old_logp_noise < 0:
        p.error(f"--old-logp-noise: expected ≥ 0, got {args.old_logp_noise}")
    if args.variants is not None:
        args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        for v in args.variants:
            parts = v.split("/")
            if len(parts) != 3 or parts[0] not in EXPERTS or parts[1] not in ATTENTION or parts[2] not in LOSSES:
                p.error(f"--variants: expected experts/attention/loss with experts in {EXPERTS}, attention in "
                        f"{ATTENTION}, loss in {LOSSES}; got {v!r}")
    return args


def max_seq_len(seq_len: int) -> int:
    return max(2, (3 * seq_len) // 2)


def set_single_process_env() -> None:
    """torchrun's variables for a world of one, unless a launcher set them (``init_parallel`` reads them)."""
    import socket

    # Megatron asks for one CUDA work queue (issue order of communication kernels); set before CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


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


def params_per_layer(args) -> tuple[int, int]:
    """(parameters of one MoE layer, parameters outside the layers)."""
    h = args.hidden
    attention = h * (args.heads + 2 * args.kv_heads) * args.head_dim + args.heads * args.head_dim * h
    layer = attention + h * args.experts + args.experts * 3 * h * args.moe_ffn + 2 * h + 2 * args.head_dim
    return layer, 2 * args.vocab * h + h


def fit_layers(args, total_bytes: int) -> int:
    """As many layers as fit ``MEMORY_FRACTION`` of the GPU at ``BYTES_PER_PARAM`` (module docstring)."""
    layer, fixed = params_per_layer(args)
    return max(1, int((MEMORY_FRACTION * total_bytes / BYTES_PER_PARAM - fixed) // layer))


def random_hf_source(hf_config: dict, seed: int, device):
    """HF tensors (on-disk names) drawn on demand like the transformers initialiser: N(0, σ) for matrices,
    1 for norm weights; each from its own generator (seed + CRC of the name), so nothing is held."""
    import torch
    import transformers

    from luspo_megatron.models.arch import transformers_config
    from luspo_megatron.models.hf_map import hf_live_to_disk

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(hf_config), dtype=torch.float32)
    shapes = {n: tuple(t.shape) for n, t in hf_live_to_disk(model.state_dict(),
                                                             bool(hf_config.get("tie_word_embeddings"))).items()}
    std = float(hf_config.get("initializer_range", 0.02))

    def get(name: str):
        if name not in shapes:
            raise KeyError(f"missing tensor {name!r}")
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], device=device)
        gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
        return torch.randn(shapes[name], generator=gen, device=device) * std

    return get


def build_policy(args: argparse.Namespace, hf_config: dict, model_dir: str, max_response_len: int,
                 longest_sequence: int, device):
    """The trainer's path: a RunConfig whose ``--hf-checkpoint`` is a directory with the config.json."""
    from luspo_megatron.config import config_from_dict
    from luspo_megatron.parallel.policy import MegatronPolicy

    Path(model_dir, "config.json").write_text(json.dumps(hf_config, indent=1))
    config = config_from_dict({
        "seed": SEED,
        "model": {"hf_checkpoint": model_dir, "dtype": args.dtype, "moe_grouped_gemm": True},
        "rollout": {"max_response_len": max_response_len},
        # No dataset here: the prompt bound only has to let the longest benchmark sequence fit a micro-batch.
        "data": {"max_prompt_len": max(1, longest_sequence - max_response_len)},
        "algorithm": {"loss": "luspo", "n_samples_per_prompt": GROUP_SIZE},
        "optimizer": {"lr": 1e-6, "lr_warmup_iters": 0, "max_tokens_per_micro_batch": args.micro_batch_tokens},
    }, source="bench_train_step")
    total_steps = len(args.variants) * (args.warmup + args.steps + 1)
    return MegatronPolicy.from_config(config, total_steps=total_steps,
                                      hf_weights=random_hf_source(hf_config, SEED, device))


# -------------------------------------------------------------------------------------------- batch
def make_batch(args: argparse.Namespace):
    """Sequences of exactly ``--tokens-per-step`` tokens in all, their count a multiple of the group
    size, and their group advantages. Returns (sequences, advantages)."""
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


# ------------------------------------------------------------------------------------------- timing
def chunks_of(policy) -> list:
    from megatron.core.utils import unwrap_model

    return [unwrap_model(m) for m in policy.model]


def select_variant(policy, variant: str, cuda: bool) -> None:
    """Switch the model's experts and attention backend, and the loss backend, to ``variant``."""
    from luspo_megatron.models.attention import set_attention_backend
    from luspo_megatron.models.experts import set_expert_impl
    from luspo_megatron.ops import backend
    from luspo_megatron.ops._extension import FORCE_REFERENCE_ENV

    experts, attention, loss = variant.split("/")
    if set_expert_impl(chunks_of(policy), experts) == 0:
        raise RuntimeError("the model has no GroupedExperts modules (built without --moe-grouped-gemm?)")
    set_attention_backend(chunks_of(policy), attention)
    if loss == "reference":
        os.environ[FORCE_REFERENCE_ENV] = "1"
    else:
        os.environ.pop(FORCE_REFERENCE_ENV, None)
    expected = "reference" if loss == "reference" else ("cuda" if cuda else "cpp")
    if backend() != expected:
        raise RuntimeError(f"{variant}: the loss backend is {backend()!r}, expected {expected!r} (build "
                           "luspo_megatron._C for this Python and device: pip install --no-build-isolation -e .)")


def run_step(policy, micro_batches, variant: str, cuda: bool) -> tuple[float, dict, int]:
    """One train step of ``variant``: (seconds, metrics, peak bytes)."""
    import resource

    import torch

    select_variant(policy, variant, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = policy.train_step(micro_batches)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    loss = metrics.get("loss", float("nan"))
    if metrics.get("skipped", 0.0) or not math.isfinite(loss):
        raise RuntimeError(f"{variant} step: non-finite loss or gradient (loss {loss}, "
                           f"grad_norm {metrics.get('grad_norm')}, skipped {metrics.get('skipped')})")
    return seconds, metrics, peak


def benchmark(policy, micro_batches, args, cuda: bool, on_update) -> dict[str, dict]:
    results = {v: {"times": [], "peak": 0, "first": None, "profile": None} for v in args.variants}
    for variant in args.variants:
        for i in range(args.warmup):
            seconds, metrics, _ = run_step(policy, micro_batches, variant, cuda)
            results[variant]["first"] = results[variant]["first"] or metrics
            print(f"  warm-up {variant} {i + 1}/{args.warmup}: {seconds:.3f} s  loss {metrics['loss']:.6g}",
                  flush=True)
    for i in range(args.steps):
        for variant in args.variants if i % 2 == 0 else args.variants[::-1]:
            seconds, metrics, peak = run_step(policy, micro_batches, variant, cuda)
            r = results[variant]
            r["times"].append(seconds)
            r["peak"] = max(r["peak"], peak)
            r["first"] = r["first"] or metrics
            print(f"  step {i + 1}/{args.steps} {variant}: {seconds:.3f} s  loss {metrics['loss']:.6g}", flush=True)
        on_update(results)
    if not args.no_profile:
        from step_profile import profile_step

        for variant in args.variants:
            select_variant(policy, variant, cuda)
            try:
                results[variant]["profile"] = profile_step(lambda: policy.train_step(micro_batches),
                                                           chunks_of(policy), cuda)
            except Exception as err:  # a profiler failure must not lose the timings above
                results[variant]["profile"] = f"profile failed: {type(err).__name__}: {err}"
            print(f"  profiled {variant}", flush=True)
            on_update(results)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    set_single_process_env()
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.variants is None:
        args.variants = GPU_VARIANTS if cuda else CPU_VARIANTS
    if not cuda and any(v.split("/")[1] == "varlen" for v in args.variants):
        raise SystemExit("--variants: varlen attention needs CUDA")
    if args.layers is None:
        if not cuda:
            raise SystemExit(f"--layers: needed for --shape {args.shape} without a GPU")
        args.layers = fit_layers(args, torch.cuda.get_device_properties(0).total_memory)
        args.layers_note = (f"{args.layers} (as many as fit: {BYTES_PER_PARAM} bytes/parameter within "
                            f"{MEMORY_FRACTION:.0%} of the GPU's memory)")
    if args.peak_tflops is None and cuda:
        name = torch.cuda.get_device_name()
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    from train_step_report import environment_line

    from luspo_megatron.parallel.policy import resolve_transformer_engine

    te = resolve_transformer_engine(False)
    print(f"bench_train_step: {environment_line(cuda)}; transformer engine: {te}; layers {args.layers}", flush=True)
    if os.environ.get("LUSPO_FORCE_REFERENCE") == "1":
        raise RuntimeError("unset LUSPO_FORCE_REFERENCE: the benchmark sets it itself for the reference variant")

    hf_config = hf_config_of_args(args)
    sequences, advantages = make_batch(args)
    max_response = max(len(s.response_ids) for s in sequences)
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        longest = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
        policy = build_policy(args, hf_config, model_dir, max_response, longest, "cuda" if cuda else "cpu")
        print(f"  model built in {time.perf_counter() - start:.1f} s", flush=True)
    micro_batches = pack(args, sequences, advantages)
    set_old_logprobs(policy, micro_batches, args.old_logp_noise)

    def on_update(results):
        text = report(args, policy, sequences, micro_batches, results, cuda, argv)
        if args.out:
            write_report(Path(args.out), text)
        return text

    results = benchmark(policy, micro_batches, args, cuda, on_update)
    os.environ.pop("LUSPO_FORCE_REFERENCE", None)
    print()
    print(on_update(results))
    if args.out:
        print(f"wrote {args.out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
