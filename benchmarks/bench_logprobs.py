"""Peak memory and time of per-token log-prob + entropy (forward + backward), chunked vs naive.

Two settings, each with both variants:

    op      the logits [T, V] are given (a leaf); the log-prob of each label and the entropy at
            temperature τ, and their gradient w.r.t. the logits (a fresh [T, V] tensor in both).
    model   as in training: from the last hidden states h [T, H] and the output weight W [V, H],
            logits = h @ Wᵀ, then log-prob + entropy, back-propagated into h and W; the chunked
            variant writes the logits' gradient into their own storage (``inplace_backward``),
            as ``parallel.train`` does.

    naive    log_softmax(logits.float() / τ) over the full [T, V], gather, −Σ p·log p
    chunked  luspo_megatron.parallel.logprobs.vocab_parallel_logprobs (tokens in chunks,
             backward recomputes)

Each variant runs in its own fresh process, so peaks do not mix. Peak memory is the increase
over the inputs: CUDA max_memory_allocated on a GPU, peak RSS (ru_maxrss) on a CPU. Time is the
median of several forward+backward runs after one warm-up.

    python benchmarks/bench_logprobs.py            # T=8192 on a GPU; T=2048 on a CPU (24 GiB)
    python benchmarks/bench_logprobs.py --quick    # T=256, hidden 128: a smoke run for `make bench`
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch

MiB = 1024**2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(variant: str, setting: str, args: dict, queue) -> None:
    torch.set_num_threads(args["threads"])
    from luspo_megatron.parallel.logprobs import default_chunk_size, vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    gen = torch.Generator(device=device).manual_seed(0)
    tokens, vocab, hidden, tau = args["tokens"], args["vocab"], args["hidden"], args["temperature"]
    h = (torch.randn(tokens, hidden, generator=gen, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * hidden**-0.5).to(dtype).requires_grad_()
    given = None
    if setting == "op":
        with torch.no_grad():
            given = (h @ w.t()).requires_grad_()
        h = w = None
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    g_logp = torch.randn(tokens, generator=gen, device=device)
    g_entropy = torch.randn(tokens, generator=gen, device=device)

    def step():
        logits = given if setting == "op" else h @ w.t()
        if variant == "naive":
            logsm = torch.log_softmax(logits.float() / tau, dim=-1)
            logp = logsm.gather(1, labels[:, None]).squeeze(1)
            entropy = -(logsm.exp() * logsm).sum(-1)
        else:
            out = vocab_parallel_logprobs(logits, labels, temperature=tau, with_entropy=True,
                                          chunk_size=args["chunk_size"], inplace_backward=setting == "model")
            logp, entropy = out.logp, out.entropy
        ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
        for leaf in (h, w, given):
            if leaf is not None:
                leaf.grad = None
        return logp.detach()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    logp = step()  # warm-up, and the peak of one fwd+bwd
    sync()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args["repeats"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    chunk = args["chunk_size"] or default_chunk_size(vocab, device)
    queue.put({"variant": variant, "setting": setting, "peak": peak, "time": statistics.median(times), "device": device,
               "chunk": chunk, "logp_sum": float(logp.double().sum())})


def measure(variant: str, setting: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(variant, setting, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke sizes (T=256, hidden 128)")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=None, help="default 1024 (256 with --quick)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk (default: 64 MiB fp32 on CPU, 512 MiB on GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    config = {
        "tokens": args.tokens or (256 if args.quick else 8192 if gpu else 2048),
        "vocab": args.vocab,
        "hidden": args.hidden or (128 if args.quick else 1024),
        "dtype": args.dtype or ("bf16" if gpu else "fp32"),
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats or (1 if args.quick else 3),
        "threads": args.threads,
    }
    device = torch.cuda.get_device_name() if gpu else f"{platform.processor() or 'cpu'}, {config['threads']} threads"
    results = {(v, s): measure(v, s, config) for s in ("op", "model") for v in ("naive", "chunked")}
    chunk = results[("chunked", "op")]["chunk"]
    print(f"# bench_logprobs: T={config['tokens']} V={config['vocab']} hidden={config['hidden']} "
          f"{config['dtype']} τ={config['temperature']} chunk={chunk} tokens, {device}")
    print("| setting | variant | peak memory over inputs (MiB) | fwd+bwd time (ms) |")
    print("|---|---|---:|---:|")
    failed = []
    for setting in ("op", "model"):
        naive, chunked = results[("naive", setting)], results[("chunked", setting)]
        for r in (naive, chunked):
            print(f"| {setting} | {r['variant']} | {r['peak'] / MiB:.0f} | {r['time'] * 1e3:.1f} |")
        memory, speed = chunked["peak"] / naive["peak"], chunked["time"] / naive["time"]
        print(f"| {setting} | **chunked / naive** | **{memory:.3f}** | **{speed:.2f}** |")
        if abs(naive["logp_sum"] - chunked["logp_sum"]) > 1e-3 * abs(naive["logp_sum"]):
            failed.append(f"{setting}: chunked and naive log-probs disagree")
        for name, ratio, target in (("memory", memory, 0.25), ("time", speed, 1.3)):
            print(f"{setting}: {name} ratio {ratio:.3f} (target ≤ {target}: {'met' if ratio <= target else 'MISSED'})")
    if failed:
        raise SystemExit("; ".join(failed))

if __name__ == "__main__":
    main()
