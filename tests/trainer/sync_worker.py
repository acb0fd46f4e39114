"""Worker (torchrun, 2 processes): the trainer's weight sync from a real 2-rank Megatron group into
two of our servers, scenario after scenario.

The trainer ranks load model B (``--policy-dir``) into their chunks at a layout; the servers serve
model A (``--reset-dir``). Before each sync, rank 0 points every server back at A (plain HTTP,
independent of the client under test) and records what they generate; then every rank calls
``trainer.weights.sync_weights`` (the real exporter, ShardPusher and WeightUpdater); then rank 0
records each server's greedy tokens, their log-probs and weight version, and every rank records
the error it got. The test compares with transformers running A and B.

Scenarios (``--scenarios``), each ``layout:mode:version[:fault]``; faults:
  sabotage  rank 0 destroys its update group on both servers first (as a restart would): they answer
            the bucket's metadata with HTTP 400 (no such group) and never join the broadcast;
  kill      rank 0 kills the second server (SIGKILL) in the middle of its export, after it has
            sent some buckets.
"""

import argparse
import faulthandler
import json
import os
import signal
import time
import urllib.request

import torch
import torch.distributed as dist

PROMPT = [11, 12, 13]
STEPS = 8


def http(method: str, url: str, body=None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read().decode() or "null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return None, str(err)


def observe(urls: list[str]) -> list[dict]:
    """Each server's greedy continuation of PROMPT, its log-probs and weight version (None: down)."""
    out = []
    for url in urls:
        status, body = http("POST", f"{url}/generate", {
            "input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": STEPS, "no_stop_trim": True}}, timeout=60)
        if status != 200:
            out.append({"up": False, "status": status})
            continue
        logprobs = body["meta_info"]["output_token_logprobs"]
        out.append({"up": True, "tokens": body["output_ids"], "logp": [e[0] for e in logprobs],
                    "version": body["meta_info"]["weight_version"]})
    return out


def build(layout: str, policy_dir: str):
    from luspo_megatron.config import ParallelConfig
    from luspo_megatron.models import arch_from_hf, load_hf_config
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import hf_safetensors_source, load_hf_weights
    from luspo_megatron.parallel.state import init_parallel

    arch = arch_from_hf(load_hf_config(policy_dir))
    sizes = {"tp2": {"tensor_model_parallel_size": 2}, "ep2": {"expert_model_parallel_size": 2},
             "pp2": {"pipeline_model_parallel_size": 2}}[layout]
    parallel = ParallelConfig(**sizes)
    init_parallel(parallel, arch, seed=1)
    chunks = build_model(arch, transformer_config(arch, parallel), use_transformer_engine=False)
    load_hf_weights(chunks, arch, hf_safetensors_source(policy_dir))
    return arch, chunks


class Policy:
    """What sync_weights needs of the policy: its own HF tensors (the real exporter)."""

    def __init__(self, arch, chunks, kill_pid: int | None = None) -> None:
        self.arch, self.chunks, self.kill_pid = arch, chunks, kill_pid

    def hf_weights(self):
        from luspo_megatron.models.hf_map import hf_name_map
        from luspo_megatron.parallel.export import export_policy_weights

        for i, item in enumerate(export_policy_weights(self.chunks, hf_name_map(self.arch))):
            if self.kill_pid is not None and i == 12:
                os.kill(self.kill_pid, signal.SIGKILL)  # the server dies in the middle of the sync
                self.kill_pid = None
            yield item


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--pids", required=True)
    parser.add_argument("--policy-dir", required=True)
    parser.add_argument("--reset-dir", required=True)
    parser.add_argument("--weights-dir", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--bucket-bytes", type=int, default=16 * 1024)
    args = parser.parse_args()
    from luspo_megatron.errors import RolloutError
    from luspo_megatron.rollout.sglang import SGLangEngine
    from luspo_megatron.runtime.distributed import init_process_group
    from luspo_megatron.trainer.weights import sync_weights

    init_process_group()
    rank = dist.get_rank()
    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where it is, and ends
    urls, pids = args.urls.split(","), [int(p) for p in args.pids.split(",")]
    engines = {}
    if rank == 0:
        for mode in ("disk", "distributed", "tensor"):
            engines[mode] = SGLangEngine(urls, weight_sync=mode, weights_dir=args.weights_dir,
                                         config_dir=args.policy_dir, bucket_bytes=args.bucket_bytes,
                                         startup_timeout_s=120, max_retries=0)
            # A broadcast that a fault leaves waiting in its gloo thread gives up after this (gloo
            # cannot be cancelled): the process must not wait the 600 s default at exit.
            engines[mode].updater.timeout_s = 30.0
    records, built = [], None
    for scenario in args.scenarios.split(","):
        layout, mode, version, *fault = scenario.split(":")
        if built != layout:
            arch, chunks = build(layout, args.policy_dir)
            built = layout
        before = None
        if rank == 0:
            for url in urls:  # a dead server just does not answer
                http("POST", f"{url}/update_weights_from_disk", {"model_path": args.reset_dir,
                                                                  "weight_version": "reset"})
            before = observe(urls)
            if fault == ["sabotage"]:
                updater = engines["distributed"].updater
                group = f"{updater.group_prefix}-g{updater._generation}-r0"
                for url in urls:  # as if both had restarted: a bucket for that group is refused at once
                    http("POST", f"{url}/destroy_weights_update_group", {"group_name": group})
        dist.barrier()
        kill = pids[1] if fault == ["kill"] and rank == 0 else None
        error, start = None, time.perf_counter()
        try:
            sync_weights(Policy(arch, chunks, kill), engines.get(mode), version)
        except RolloutError as err:
            error = str(err)
        seconds = time.perf_counter() - start
        after = observe(urls) if rank == 0 else None
        files = sorted(os.listdir(args.weights_dir)) if rank == 0 and os.path.isdir(args.weights_dir) else []
        print(f"rank {rank}: {scenario}: {time.perf_counter() - start:.2f} s, {error}", flush=True)
        records.append({"scenario": scenario, "error": error, "before": before, "after": after, "files": files,
                        "seconds": seconds})
        dist.barrier()
    for engine in engines.values():
        engine.close()
    torch.save(records, f"{args.out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
