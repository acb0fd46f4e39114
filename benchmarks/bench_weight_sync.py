"""Weight-sync time and peak extra memory per trainer rank against the model size: disk and
distributed, at 1, 2 and 4 trainer ranks, into our SGLang-API server.

    python benchmarks/bench_weight_sync.py [--quick]     # writes docs/bench/weight_sync[_quick].md

For each model size it writes a Qwen3-MoE HF directory (random weights; hidden 256, 4 layers,
16 experts of width F, vocab 8192, untied; F sets the size), starts one of our servers on it, and
for 1, 2 and 4 ranks launches a trainer group (torchrun) in two layouts: ``--ep R`` (experts split
over the ranks: every rank owns and pushes a share, nothing is gathered) and ``--tp R`` (every
tensor gathered onto TP rank 0, the one owner). The group loads the same weights into Megatron and
syncs them
through the real path (``trainer/weights.py``: the sharded exporter, each rank's ShardPusher, the
WeightUpdater on rank 0): one warm-up sync (the distributed one makes the update groups), then
``--repeats`` timed ones per mode. Time: rank 0's wall time of ``sync_weights`` (pause, flush,
export, transport, publish and load, continue), median. Memory: each rank's peak extra memory
during a sync (``runtime/memory.py``: the resident-set high-water mark over the sync, the
processes run with ``MALLOC_MMAP_THRESHOLD_``; on CUDA also the allocator's peak), the largest
rank's. The ratios are against the same run: time against the 1-rank sync of the same model and
mode, memory against the model's size.

On a GPU machine the same script uses NCCL between the trainer ranks and for the update groups,
CUDA tensors on the trainer, and the server on the GPU (``--device cuda`` is the default there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             head_dim=64, intermediate_size=1024, num_experts=16, num_experts_per_tok=2)
MODES = ("disk", "distributed")


# --------------------------------------------------------------------------------------- trainer side
def worker(args: argparse.Namespace) -> None:
    """One trainer rank (under torchrun): build, warm up, time the syncs, write this rank's results."""
    import torch.distributed as dist

    from luspo_megatron.config import ParallelConfig
    from luspo_megatron.models import arch_from_hf, load_hf_config
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_name_map
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import hf_safetensors_source, load_hf_weights
    from luspo_megatron.parallel.export import export_policy_weights
    from luspo_megatron.parallel.state import init_parallel
    from luspo_megatron.rollout.sglang import SGLangEngine
    from luspo_megatron.runtime.memory import PeakMemory
    from luspo_megatron.trainer.weights import sync_weights

    arch = arch_from_hf(load_hf_config(args.model_dir))
    world = int(os.environ["WORLD_SIZE"])
    parallel = ParallelConfig(**({"expert_model_parallel_size": world} if args.layout == "ep"
                                 else {"tensor_model_parallel_size": world}))
    init_parallel(parallel, arch, seed=0)
    config = transformer_config(arch, parallel, dtype=args.dtype)
    chunks = build_model(arch, config, use_transformer_engine=False)
    load_hf_weights(chunks, arch, hf_safetensors_source(args.model_dir))
    name_map = hf_name_map(arch)

    class Policy:
        def hf_weights(self):
            return export_policy_weights(chunks, name_map)

    rank = dist.get_rank()
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        engine = None
        if rank == 0:
            engine = SGLangEngine([args.url], weight_sync=mode, weights_dir=Path(args.work) / "rollout_weights",
                                  config_dir=args.model_dir, bucket_bytes=args.bucket_bytes, startup_timeout_s=600)
        first = time.perf_counter()
        sync_weights(Policy(), engine, f"{mode}-0")  # warm-up; distributed: makes the update groups
        first = time.perf_counter() - first
        seconds, host, cuda = [], [], []
        for i in range(args.repeats):
            dist.barrier()
            with PeakMemory() as peak:
                start = time.perf_counter()
                sync_weights(Policy(), engine, f"{mode}-{i + 1}")
                seconds.append(time.perf_counter() - start)
            host.append(peak.host_bytes or 0)
            cuda.append(peak.cuda_bytes or 0)
        results[mode] = {"first_s": first, "seconds": seconds, "host": max(host), "cuda": max(cuda)}
        if engine is not None:
            engine.close()
    own = sum(t.numel() * t.element_size() for _, t in Policy().hf_weights())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": rank, "own_bytes": own, "results": results})
    if rank == 0:
        Path(args.result).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- driver
def build_model_dir(path: Path, width: int, dtype: torch.dtype) -> tuple[int, int]:
    """A random Qwen3-MoE HF directory; returns (bytes, largest tensor bytes)."""
    from transformers import AutoModelForCausalLM

    from luspo_megatron.models import tiny_qwen3_moe, transformers_config

    torch.manual_seed(0)
    config = tiny_qwen3_moe(**SHAPE, moe_intermediate_size=width)
    model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=dtype)
    model.save_pretrained(path)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    largest = max(sizes + [2 * width * SHAPE["hidden_size"] * model.dtype.itemsize])  # a fused expert fc1
    return sum(sizes), largest


def run_group(ranks: int, layout: str, model_dir: Path, url: str, work: Path, args: argparse.Namespace) -> list[dict]:
    from luspo_megatron.runtime.memory import MMAP_THRESHOLD_ENV

    result = work / f"result-{ranks}-{layout}.json"
    env = dict(os.environ, **MMAP_THRESHOLD_ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           "--worker", "--model-dir", str(model_dir), "--url", url, "--work", str(work), "--result", str(result),
           "--modes", ",".join(MODES), "--repeats", str(args.repeats), "--bucket-bytes", str(args.bucket_bytes),
           "--dtype", args.dtype, "--layout", layout]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller models, 2 repeats.")
    parser.add_argument("--out", default=None, help="Default: docs/bench/weight_sync[_quick].md.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranks", default="1,2,4")
    # worker mode (launched by the driver under torchrun)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model-dir", "--url", "--work", "--result", "--modes"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-bytes", type=int, default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--layout", default="ep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import transformers

    from luspo_megatron.rollout.local.process import LocalServer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    widths = (64, 256) if args.quick else (256, 1024)
    args.out = args.out or str(ROOT / "docs" / "bench" / f"weight_sync{'_quick' if args.quick else ''}.md")
    args.repeats = 2 if args.quick else args.repeats
    args.bucket_bytes = args.bucket_bytes or (4 if args.quick else 16) * 1024**2
    rows, load = [], os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            model_dir = Path(tmp) / f"model-{width}"
            model_bytes, largest = build_model_dir(model_dir, width, torch_dtype)
            server = LocalServer(model_dir, device=args.device, dtype="bfloat16" if cuda else "float32",
                                 log_path=Path(tmp) / f"server-{width}.log")
            with server:
                for ranks in map(int, args.ranks.split(",")):
                    for layout in ("ep",) if ranks == 1 else ("ep", "tp"):
                        work = Path(tmp) / f"work-{width}-{ranks}-{layout}"
                        work.mkdir()
                        group = run_group(ranks, layout, model_dir, server.url, work, args)
                        for mode in MODES:
                            per_rank = [r["results"][mode] for r in group]
                            rows.append({"mode": mode, "model": model_bytes, "largest": largest, "ranks": ranks,
                                         "layout": "-" if ranks == 1 else f"{layout}{ranks}",
                                         "owners": sum(1 for r in group if r["own_bytes"]),
                                         "seconds": statistics.median(per_rank[0]["seconds"]),
                                         "first": per_rank[0]["first_s"], "host": max(r["host"] for r in per_rank),
                                         "cuda": max(r["cuda"] for r in per_rank)})
                        print(f"model {model_bytes / 2**20:.0f} MiB, {ranks} ranks {layout}: done", flush=True)
    write_table(rows, args, started, load)


def write_table(rows: list[dict], args: argparse.Namespace, started: str, load: float) -> None:
    mib = 2**20
    lines = [
        "# Weight sync: time and peak extra memory per trainer rank",
        "",
        "`benchmarks/bench_weight_sync.py` (its docstring says what is measured and how).",
        "",
        "```bash",
        f"python benchmarks/bench_weight_sync.py{' --quick' if args.quick else ''}",
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}, "
        f"{args.dtype}; started {started}, load average {load:.1f} before the run. One engine (our server); "
        f"bucket (`--update-weight-buffer-size`) {args.bucket_bytes / mib:.0f} MiB; median of {args.repeats} syncs "
        "after one warm-up. \"peak / model\" is against what the deleted every-rank exporter held on every "
        "rank at least: the whole model.",
        "",
        "| mode | model MiB | ranks | layout | owning ranks | sync s | GiB/s | time vs 1 rank | first sync s "
        "| peak extra host MiB (largest rank) | peak / model | peak / (2 buckets + largest tensor) "
        "| peak extra CUDA MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["model"] == row["model"] and r["ranks"] == 1)
        bound = 2 * args.bucket_bytes + row["largest"]
        lines.append(
            f"| {row['mode']} | {row['model'] / mib:.0f} | {row['ranks']} | {row['layout']} | {row['owners']} | "
            f"{row['seconds']:.2f} | "
            f"{row['model'] / row['seconds'] / 2**30:.3f} | {row['seconds'] / base['seconds']:.2f} | "
            f"{row['first']:.2f} | {row['host'] / mib:.1f} | {row['host'] / row['model']:.3f} | "
            f"{row['host'] / bound:.2f} | {row['cuda'] / mib:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
