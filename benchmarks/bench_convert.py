"""Conversion throughput and peak memory against checkpoint size, both directions.

    .venv/bin/python benchmarks/bench_convert.py            # ~1 GB and ~2 GB, 1 and 2 ranks
    .venv/bin/python benchmarks/bench_convert.py --quick    # ~0.15 GB and ~0.3 GB, 1 rank

Writes a synthetic Qwen3-MoE-shaped checkpoint (random bf16 weights; hidden 1024, 16 heads / 4 KV
heads, 32 experts of 384, untied embeddings; vocab 151936, ``--quick``: 32768) in 500 MB
safetensors shards (``--quick``: 50 MB), then times ``tools/convert_hf_to_megatron.py`` and
``tools/convert_megatron_to_hf.py`` as separate processes (under torchrun for 2 ranks).

Memory, sampled every 10 ms from /proc for each converting process (the table shows the largest
rank's): peak RssAnon (tensors and the Python heap) and peak RSS (RssAnon + mapped file pages:
safetensors maps its files, so tensors read from them stay file-backed until copied). "base" is the
RssAnon of a process that only imports the same modules. Throughput: checkpoint bytes / wall time
of the process (start-up and imports included) and / "convert s", the time the tool reports for
its own work. The export also checks every tensor's sha256 against the manifest (in its time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from luspo_megatron.models import tiny_qwen3_moe  # noqa: E402

SHAPE = dict(vocab_size=151936, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=3072, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
             torch_dtype="bfloat16")


def synthetic_checkpoint(directory: Path, layers: int, shard_bytes: int, vocab: int) -> tuple[int, int, int]:
    """A Qwen3-MoE HF directory with random bf16 weights. Returns (bytes, largest tensor, largest layer)."""
    config = tiny_qwen3_moe(num_hidden_layers=layers, **{**SHAPE, "vocab_size": vocab})
    h, hd, nh, nkv, e, f, v = (config[k] for k in ("hidden_size", "head_dim", "num_attention_heads",
                                                   "num_key_value_heads", "num_experts", "moe_intermediate_size",
                                                   "vocab_size"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    layer_bytes = 0
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                 p + "self_attn.q_proj.weight": (nh * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
                 p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nh * hd),
                 p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                 p + "mlp.gate.weight": (e, h)}
        for x in range(e):
            expert = p + f"mlp.experts.{x}."
            layer.update({expert + "gate_proj.weight": (f, h), expert + "up_proj.weight": (f, h),
                          expert + "down_proj.weight": (h, f)})
        layer_bytes = sum(torch.Size(s).numel() * 2 for s in layer.values())
        shapes.update(layer)
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    directory.mkdir(parents=True)
    files: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if files[-1] and size + nbytes > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({n: (torch.rand(shapes[n], generator=gen) - 0.5).to(torch.bfloat16) for n in names},
                  directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return total, max(torch.Size(s).numel() * 2 for s in shapes.values()), layer_bytes


def _rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssAnon + RssFile) in kB, 0 once the process is gone."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    anon = fields.get("RssAnon", 0)
    return anon, anon + fields.get("RssFile", 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def run_measured(cmd: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RssAnon, peak RSS in bytes of the largest converting process, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[int, tuple[int, int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stack = [proc.pid]
            while stack:
                pid = stack.pop()
                anon, rss = _rss_kb(pid)
                old = peak.get(pid, (0, 0))
                peak[pid] = (max(old[0], anon), max(old[1], rss))
                stack.extend(_children(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    # under torchrun the ranks are children of the launcher, which converts nothing
    workers = [v for pid, v in peak.items() if pid != proc.pid] if len(peak) > 1 else list(peak.values())
    return wall, max(w[0] for w in workers) * 1024, max(w[1] for w in workers) * 1024, output


def baseline() -> tuple[int, int]:
    """(RssAnon, RSS) of a process that imports what a converter imports, and converts nothing."""
    code = ("import megatron.core.dist_checkpointing, transformers, luspo_megatron.checkpoint.convert;"
            "from transformers import AutoModelForCausalLM; import time; time.sleep(0.5)")
    return run_measured([sys.executable, "-c", code])[1:3]


def tool_seconds(output: str) -> float:
    for line in output.splitlines():
        if line.startswith("wrote ") and " s on " in line:
            return float(line.split(" in ")[-1].split(" s on ")[0])
    return float("nan")


def launch(nproc: int, script: str, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / "tools" / script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "tools" / script), *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small checkpoints, one rank (make bench)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    layer_counts = (1, 2) if args.quick else (8, 16)
    ranks = (1,) if args.quick else (1, 2)
    shard = 50 * 10**6 if args.quick else 500 * 10**6
    vocab = 32768 if args.quick else 151936
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    base_anon, base_rss = baseline()
    rows = []
    try:
        for layers in layer_counts:
            source = work / f"hf_{layers}"
            total, largest, layer_bytes = synthetic_checkpoint(source, layers, shard, vocab)
            for n in ranks:
                megatron, back = work / f"megatron_{layers}_{n}", work / f"back_{layers}_{n}"
                wall, anon, rss, out = run_measured(launch(n, "convert_hf_to_megatron.py",
                                                           ["--hf-dir", str(source), "--save", str(megatron),
                                                            "--no-progress"]))
                rows.append(("HF -> Megatron", total, n, wall, tool_seconds(out), anon, rss, largest, layer_bytes))
                wall, anon, rss, out = run_measured(launch(n, "convert_megatron_to_hf.py",
                                                           ["--load", str(megatron), "--save", str(back),
                                                            "--no-progress"]))
                if "match the source checksums" not in out:
                    raise SystemExit(f"export was not verified:\n{out[-2000:]}")
                rows.append(("Megatron -> HF", total, n, wall, tool_seconds(out), anon, rss, largest, layer_bytes))
                shutil.rmtree(megatron)
                shutil.rmtree(back)
            shutil.rmtree(source)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"# bench_convert ({'quick' if args.quick else 'full'}): {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, load average {load:.1f}; "
          f"base (imports only): RssAnon {base_anon / 1e6:.0f} MB, RSS {base_rss / 1e6:.0f} MB")
    print("| direction | checkpoint GB | ranks | wall s | convert s | GB/s wall | GB/s convert "
          "| peak RssAnon − base MB | peak RSS − base MB | largest tensor MB | one layer MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for direction, total, n, wall, conv, anon, rss, largest, layer in rows:
        print(f"| {direction} | {total / 1e9:.2f} | {n} | {wall:.1f} | {conv:.1f} | {total / 1e9 / wall:.3f} "
              f"| {total / 1e9 / conv:.3f} | {(anon - base_anon) / 1e6:.0f} | {(rss - base_rss) / 1e6:.0f} "
              f"| {largest / 1e6:.0f} | {layer / 1e6:.0f} |")


if __name__ == "__main__":
    main()
