"""Rollout throughput of our SGLang-API server on a tiny Qwen3-MoE, and the cost of the HTTP path.

    python benchmarks/bench_rollout.py [--quick] [--device cpu|cuda]

For concurrency 1, 8 and 32 (requests in flight from the client) it reports generated tokens/s
through the real stack (SGLangEngine -> HTTP -> server subprocess -> batched model.generate), and
the same batches run in-process on TransformersGenerator (no HTTP, no server). The ratio of the
two is the client + server overhead. Also: server start-up time until /health_generate answers 200.
The model is the embedded default's size (hidden 64, 2 layers, 4 experts, real Qwen3 vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def build_model(path: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, eos_token_id=151645, pad_token_id=151643,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


def prompts(count: int, length: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 100000, (count, length), generator=g).tolist()


def wait_health(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health_generate", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("server not healthy")


def over_http(engine, batch, concurrency, sampling) -> int:
    """``concurrency`` requests in flight at a time, as a rollout step issues them; tokens generated."""
    return sum(len(g[0].response_ids) for start in range(0, len(batch), concurrency)
               for g in engine.generate(batch[start:start + concurrency], sampling, n=1))


def in_process(generator, batch, concurrency, new_tokens) -> int:
    """The same batches straight into the generator (no HTTP, no server process)."""
    from luspo_megatron.rollout.local.generation import GenRow

    return sum(len(r.tokens) for start in range(0, len(batch), concurrency)
               for r in generator.generate([GenRow(p, new_tokens, seed=i)
                                            for i, p in enumerate(batch[start:start + concurrency])]))


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def best_of(run, repeats: int, *args) -> tuple[int, float]:
    """(tokens, seconds) of the fastest of ``repeats`` runs of ``run(*args)``."""
    results = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run(*args)
        results.append((tokens, time.perf_counter() - t0))
    return min(results, key=lambda r: r[1] / r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests and shorter responses.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from luspo_megatron.rollout.engine import SamplingParams
    from luspo_megatron.rollout.local.generation import GenRow, TransformersGenerator
    from luspo_megatron.rollout.local.process import LocalServer
    from luspo_megatron.rollout.sglang import SGLangEngine
    from luspo_megatron.runtime.distributed import free_port

    new_tokens = 32 if args.quick else 128
    rounds = 2 if args.quick else 4  # requests per concurrency slot
    repeats = 3  # best of: the machine is shared, the minimum is the least disturbed run
    sampling = SamplingParams(max_new_tokens=new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "tiny")
        server = LocalServer(model_dir, port=free_port(), device=args.device, max_running_requests=64,
                             threads=int(os.environ["OMP_NUM_THREADS"]))
        load = os.getloadavg()[0]
        started = time.perf_counter()
        server.launch()
        wait_health(server.url)
        startup_s = time.perf_counter() - started
        rows = []
        try:
            generator = TransformersGenerator(model_dir, device=args.device)
            with SGLangEngine([server.url], max_concurrency=64) as engine:
                engine.generate(prompts(2), sampling, n=1)  # warm-up
                generator.generate([GenRow(p, new_tokens, seed=0) for p in prompts(2)])
                for concurrency in (1, 8, 32):
                    batch = prompts(concurrency * rounds)

                    tokens, http_s = best_of(over_http, repeats, engine, batch, concurrency, sampling)
                    local_tokens, local_s = best_of(in_process, repeats, generator, batch, concurrency, new_tokens)
                    # Normalised per generated token, so a different stop point cannot skew the ratio.
                    ratio = (http_s / tokens) / (local_s / local_tokens)
                    overhead_ms = (http_s / tokens - local_s / local_tokens) * tokens / len(batch) * 1e3
                    rows.append((concurrency, len(batch), tokens, tokens / http_s, local_tokens / local_s, ratio,
                                 overhead_ms))
                # Latency of one 1-token request: the fixed cost of the HTTP path, median of 20.
                one = SamplingParams(max_new_tokens=1, seed=0)
                http_ms = median_ms(lambda: engine.generate([batch[0]], one, n=1), 20)
                local_ms = median_ms(lambda: generator.generate([GenRow(batch[0], 1, seed=0)]), 20)
            info = json.loads(urllib.request.urlopen(f"{server.url}/server_info").read())["internal_states"][0]
        finally:
            server.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, device {args.device}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"model: Qwen3-MoE hidden 64, 2 layers, 4 experts (top-2), vocab 151936; prompt 32 tokens, "
          f"max_new_tokens {new_tokens}")
    print(f"server start-up until /health_generate = 200: {startup_s:.2f} s (load average before: {load:.1f})")
    print(f"throughput: best of {repeats} runs per cell")
    print(f"server batches: {info['batches']}, largest {info['max_batch_rows']} rows")
    print(f"one 1-token request (median of 20): {http_ms:.1f} ms over HTTP, {local_ms:.1f} ms in-process "
          f"-> fixed cost of the HTTP path {http_ms - local_ms:.1f} ms\n")
    print("| concurrency | requests | tokens | HTTP tokens/s | in-process tokens/s | HTTP / in-process time "
          "| overhead per request (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c, n, tokens, http_tps, local_tps, ratio, overhead_ms in rows:
        print(f"| {c} | {n} | {tokens} | {http_tps:.0f} | {local_tps:.0f} | {ratio:.2f} | {overhead_ms:.1f} |")


if __name__ == "__main__":
    main()
