"""CPU benchmark of the fused sequence log-ratio + policy loss (csrc/) against the eager reference.

For every (T tokens, B sequences) it times ``policy_loss(...)`` + ``loss.backward()`` (what the last
pipeline stage runs per micro-batch, metrics included) on both backends in the same run, and measures
the peak extra memory of one forward+backward.

Memory, two ways, both including the gradient the call returns, both also given in "token arrays"
(T × 4 bytes, one float32 array of the packed length). ``tracemalloc`` would see neither: torch's CPU
tensors come from its own allocator (malloc / mmap), not from Python's.
  * alloc: torch's profiler with ``profile_memory=True`` records every allocation and free of torch's
    CPU allocator; the running sum over one forward+backward, in time order, peaks at the number given.
    Exact for tensors; blind to memory a kernel takes with plain malloc (ours: 56 KiB per thread).
  * RSS: each (backend, T, B) in a fresh subprocess: inputs built, one warm-up call on the same shapes,
    then the kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), the call runs, and
    peak extra = VmHWM − VmRSS-before. glibc's dynamic mmap threshold is pinned
    (MALLOC_MMAP_THRESHOLD_=64 KiB, MALLOC_TRIM_THRESHOLD_=0) so that every token-sized temporary is a
    fresh mapping returned on free, i.e. RSS tracks live memory instead of heap reuse hiding it. Sees
    everything, but Linux updates a thread's RSS counter in steps of 64 pages, so below ~0.5 MiB (T ≲ 1e5)
    it is coarse; the alloc column is the precise one there.

    python benchmarks/bench_seq_logratio.py [--quick] [--threads N] [--repeats N]
    python benchmarks/bench_seq_logratio.py --device cuda     # the CUDA kernels (see main_cuda)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIONS = {
    "plain": {},
    "tis+kl": {"use_tis": True, "tis_level": "token", "tis_clip": 2.0, "kl_coef": 0.01, "kl_type": "k3"},
}


def make_inputs(total_tokens: int, num_seqs: int, seed: int = 0, device: str = "cpu"):
    """Packed float32 batch: B sequences of random length (0.5–1.5 × T/B, 20 % prompt), exactly T tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(num_seqs, generator=gen, dtype=torch.float64)
    lengths = (weights / weights.sum() * total_tokens).floor().long()
    lengths[-1] += total_tokens - int(lengths.sum())
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    starts = cu[:-1].long().repeat_interleave(lengths)
    position = torch.arange(total_tokens) - starts
    prompt = (lengths // 5).repeat_interleave(lengths)
    mask = (position >= prompt).float()
    logp = -torch.rand(total_tokens, generator=gen) * 3
    old = logp + torch.randn(total_tokens, generator=gen) * 1e-2
    inputs = {
        "logp": logp,
        "old_logp": old,
        "rollout_logp": old + torch.randn(total_tokens, generator=gen) * 0.1,
        "ref_logp": logp + torch.randn(total_tokens, generator=gen) * 0.1,
        "loss_mask": mask,
        "cu_seqlens": cu,
        "advantages": torch.randn(num_seqs, generator=gen),
    }
    return {key: value.to(device) for key, value in inputs.items()}


def run_once(inputs, name: str, option: str, grad_mode: str | None = None):
    """One forward + backward of policy_loss; returns the metrics (so nothing is optimised away)."""
    from luspo_megatron.algorithms.losses import LossConfig, policy_loss
    from luspo_megatron.ops import fused_policy_loss

    fused_policy_loss.DEFAULT_GRAD_MODE = grad_mode or "store"
    cfg = LossConfig(name=name, **OPTIONS[option])
    logp = inputs["logp"].detach().requires_grad_(True)
    # As the trainer calls it: rollout log-probs only with TIS, reference log-probs only with a KL term.
    loss, metrics = policy_loss(
        logp, inputs["old_logp"], inputs["advantages"], inputs["loss_mask"], inputs["cu_seqlens"], cfg,
        num_sequences=inputs["advantages"].numel(),
        rollout_logp=inputs["rollout_logp"] if cfg.use_tis else None,
        ref_logp=inputs["ref_logp"] if cfg.kl_coef > 0 else None,
    )
    loss.backward()
    return metrics


def _set_backend(which: str) -> None:
    if which == "reference":
        os.environ["LUSPO_FORCE_REFERENCE"] = "1"
    else:
        os.environ.pop("LUSPO_FORCE_REFERENCE", None)


def time_case(which: str, inputs, name: str, option: str, repeats: int, grad_mode: str | None = None) -> list[float]:
    from luspo_megatron.ops import backend

    _set_backend(which)
    assert backend() == ("reference" if which == "reference" else "cpp"), backend()
    return _time_calls(lambda: run_once(inputs, name, option, grad_mode), repeats)


def _time_calls(call, repeats: int) -> list[float]:
    call()  # warm-up
    times = []
    gc.disable()  # as timeit does: a cyclic-GC pass of the whole interpreter is not the op's time
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


# ---- memory ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_profiler():
    """torch's profiler (kineto) prints start/stop lines to the stderr file descriptor; keep the tables clean."""
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield prof
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def allocator_peak(which: str, inputs, name: str, option: str, grad_mode: str | None = None) -> int:
    """Peak of torch's CPU allocator (live bytes above the start) over one forward+backward."""
    _set_backend(which)
    run_once(inputs, name, option, grad_mode)  # warm-up
    with quiet_profiler() as prof:
        run_once(inputs, name, option, grad_mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak



def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(which: str, total_tokens: int, num_seqs: int, name: str, option: str, grad_mode: str | None) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _set_backend(which)
    inputs = make_inputs(total_tokens, num_seqs)
    run_once(inputs, name, option, grad_mode)  # warm-up: lazy initialisation is not the op's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run_once(inputs, name, option, grad_mode)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024}))


def measure_memory(which: str, total_tokens: int, num_seqs: int, name: str, option: str,
                   grad_mode: str | None = None) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--memory-child", which, str(total_tokens), str(num_seqs), name, option,
           grad_mode or "default"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


# ---- tables ---------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.machine()


def _rss(extra_bytes: int, array_bytes: int) -> str:
    # Linux counts a thread's RSS in steps of 64 pages (256 KiB): smaller deltas are below its resolution.
    return "<256 KiB" if abs(extra_bytes) < 256 * 1024 else f"{extra_bytes / array_bytes:.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# ---- GPU -------------------------------------------------------------------------------------------------------


def _cuda_timed(call, repeats: int) -> list[float]:
    """Seconds per call from CUDA events (one warm-up first); the host waits for the device after each."""
    import torch

    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _cuda_peak_extra(call) -> int:
    import torch

    call()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (as the kernels are)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / statistics.median(_cuda_timed(lambda: dst.copy_(src), repeats))


def _kernel_call(inputs, name: str, option: str):
    """The two fused kernels alone (forward writes the gradient; backward scales it): no metrics, no host
    work beyond launching. Returns the call and the bytes it must move at least: every token array it
    reads once, plus the gradient written once."""
    from luspo_megatron.algorithms.losses import LossConfig
    from luspo_megatron.ops import PolicyLossSpec, seq_policy_loss

    cfg = LossConfig(name=name, **OPTIONS[option])
    spec = PolicyLossSpec(loss=name, agg=cfg.agg, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high,
                          num_sequences=inputs["advantages"].numel(),
                          tis_level=cfg.tis_level if cfg.use_tis else "none", tis_clip=cfg.tis_clip,
                          kl_type=cfg.kl_type if cfg.kl_coef > 0 else "none", kl_coef=cfg.kl_coef)
    rollout = inputs["rollout_logp"] if cfg.use_tis else None
    ref = inputs["ref_logp"] if cfg.kl_coef > 0 else None

    def call():
        logp = inputs["logp"].detach().requires_grad_(True)
        out = seq_policy_loss(logp, inputs["old_logp"], inputs["loss_mask"], inputs["cu_seqlens"],
                              inputs["advantages"], spec, rollout_logp=rollout, ref_logp=ref)
        out.loss.backward()

    arrays = 3 + (rollout is not None) + (ref is not None) + 1  # logp, old, mask, [rollout], [ref], grad
    return call, arrays * inputs["logp"].numel() * inputs["logp"].element_size()


def _device_time(call, repeats: int) -> tuple[float, list[tuple[str, float]]]:
    """Seconds of GPU kernel time per call (torch profiler, CUDA activity: the kernels' own durations, not
    the host's launch latency), and the per-kernel split (name, seconds per call)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e6 / repeats
    split = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return sum(per_kernel.values()), split


def _cuda_row(inputs, name: str, option: str, repeats: int, copy_bw: float) -> tuple[str, list]:
    from luspo_megatron.ops import backend

    result = {}
    for which in ("reference", "cuda"):
        _set_backend(which)
        assert backend() == which, backend()
        call = functools.partial(run_once, inputs, name, option)
        result[which] = (statistics.median(_cuda_timed(call, repeats)), _cuda_peak_extra(call))
    kernels, nbytes = _kernel_call(inputs, name, option)
    device_s, split = _device_time(kernels, repeats)
    total, seqs = inputs["logp"].numel(), inputs["advantages"].numel()
    array = total * 4
    row = (f"| {name} | {option} | {total:.0e} | {seqs} | {_ms(result['reference'][0])} "
           f"| {_ms(result['cuda'][0])} | {result['reference'][0] / result['cuda'][0]:.1f}x | {device_s * 1e3:.3f} "
           f"| {nbytes / device_s / 1e9:.0f} | {100 * nbytes / device_s / copy_bw:.0f}% "
           f"| {result['reference'][1] / array:.1f} | {result['cuda'][1] / array:.1f} |")
    return row, split


def main_cuda(args) -> None:
    """GPU table: policy_loss forward + backward (as the trainer calls it, metrics included) on the CUDA
    kernels vs the eager reference on the same GPU (host wall time: at these sizes the eager path is
    launch-bound), then the fused kernels' own GPU time and their effective bandwidth (the bytes they must
    move at least / kernel time) against a device-to-device copy measured in the same run."""
    import torch

    repeats = args.repeats or (5 if args.quick else 20)
    sizes = [(10**5, 64), (10**6, 64), (10**6, 1024), (4 * 10**6, 1024), (8 * 10**6, 1024), (8 * 10**6, 16384),
             (32 * 10**6, 16384)]
    if args.quick:
        sizes = [(10**6, 64), (8 * 10**6, 1024)]
    cases = [("luspo", "plain"), ("luspo", "tis+kl"), ("grpo", "plain"), ("grpo", "tis+kl")]
    copy_bw = _copy_bandwidth(8 * 10**6 * 4 * 6, repeats)
    print(f"# bench_seq_logratio --device cuda  {date.today()}  {torch.cuda.get_device_name()}  "
          f"torch {torch.__version__}  CUDA {torch.version.cuda}  repeats={repeats}  float32")
    print(f"# device-to-device copy (bytes read + written): {copy_bw / 1e9:.0f} GB/s")
    print("# policy_loss fwd+bwd: the whole call as the trainer makes it (metrics included), host wall, median ms")
    print("# kernel ms: GPU time of the fused kernels alone per forward+backward (profiler); effective GB/s = "
          "(token arrays read once + gradient written once) / kernel time; extra = peak allocation over one "
          "policy_loss call in token arrays (T x 4 B)")
    header = ("| loss | options | T | B | eager policy_loss ms | cuda policy_loss ms | speed-up | kernel ms "
              "| effective GB/s | % of copy | eager extra | cuda extra |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    splits = {}
    for name, option in cases:
        for total, seqs in sizes:
            inputs = make_inputs(total, seqs, device="cuda")
            row, splits[(name, option, total, seqs)] = _cuda_row(inputs, name, option, repeats, copy_bw)
            print(row, flush=True)
            del inputs
            torch.cuda.empty_cache()
    print("\n# where the kernel time goes (GPU time per forward+backward, us)")
    for key in [("luspo", "plain", 8 * 10**6, 1024), ("grpo", "tis+kl", 8 * 10**6, 1024)]:
        if key in splits:
            print(f"- {key[0]} {key[1]} T={key[2]:.0e} B={key[3]}: "
                  + ", ".join(f"{n[:60]} {t * 1e6:.1f}" for n, t in splits[key][:6]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="luspo only, fewer repeats (make bench)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the CUDA kernels on the GPU (needs a CUDA build of csrc/)")
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    if args.memory_child:
        which, total, seqs, name, option, mode = args.memory_child
        memory_child(which, int(total), int(seqs), name, option, None if mode == "default" else mode)
        return

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = [(10**4, 64), (10**4, 1024), (10**5, 64), (10**5, 1024), (10**6, 64), (10**6, 1024)]
    cases = [("luspo", "plain")] if args.quick else [("luspo", "plain"), ("luspo", "tis+kl"), ("grpo", "plain"),
                                                     ("grpo", "tis+kl")]
    import luspo_megatron._C as ext

    print(f"# bench_seq_logratio  {date.today()}  {_cpu_name()}  torch {torch.__version__}  "
          f"threads={args.threads}  repeats={repeats}  float32  cpu kernels: {ext.cpu_isa()}  "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    print("# time: policy_loss forward + backward (metrics included), min / median over repeats, ms")
    print("# memory: peak extra of one forward+backward (gradient included), in token arrays of T x 4 B:")
    print("#   alloc = torch allocator peak (profiler), RSS = peak RSS in a fresh process (coarse below ~1e5)")
    header = ("| loss | options | T | B | eager min | eager median | cpp min | cpp median | speed-up min "
              "| speed-up median | eager alloc | cpp alloc | eager RSS | cpp RSS |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, option in cases:
        for total, seqs in sizes:
            inputs = make_inputs(total, seqs)
            eager = time_case("reference", inputs, name, option, repeats)
            fused = time_case("cpp", inputs, name, option, repeats)
            alloc = {w: allocator_peak(w, inputs, name, option) for w in ("reference", "cpp")}
            rss = {w: measure_memory(w, total, seqs, name, option) for w in ("reference", "cpp")}
            array = total * 4
            print(f"| {name} | {option} | {total:.0e} | {seqs} | {_ms(min(eager))} | {_ms(statistics.median(eager))} "
                  f"| {_ms(min(fused))} | {_ms(statistics.median(fused))} "
                  f"| {min(eager) / min(fused):.1f}x | {statistics.median(eager) / statistics.median(fused):.1f}x "
                  f"| {alloc['reference'] / array:.2f} | {alloc['cpp'] / array:.2f} "
                  f"| {_rss(rss['reference'], array)} | {_rss(rss['cpp'], array)} |", flush=True)

    if not args.quick:
        print("\n# backward: stored gradient (forward writes ∂L/∂logp) vs recomputed (phase 2 again in backward)")
        print("| loss | options | T | B | store min ms | store median ms | recompute min ms | recompute median ms "
              "| store alloc | recompute alloc | store RSS | recompute RSS |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, option in [("luspo", "plain"), ("grpo", "tis+kl")]:
            total, seqs = 10**6, 64
            inputs = make_inputs(total, seqs)
            modes = ("store", "recompute")
            t = {m: time_case("cpp", inputs, name, option, repeats, m) for m in modes}
            alloc = {m: allocator_peak("cpp", inputs, name, option, m) / total / 4 for m in modes}
            rss = {m: _rss(measure_memory("cpp", total, seqs, name, option, m), total * 4) for m in modes}
            print(f"| {name} | {option} | {total:.0e} | {seqs} | {_ms(min(t['store']))} "
                  f"| {_ms(statistics.median(t['store']))} | {_ms(min(t['recompute']))} "
                  f"| {_ms(statistics.median(t['recompute']))} | {alloc['store']:.2f} | {alloc['recompute']:.2f} "
                  f"| {rss['store']} | {rss['recompute']} |", flush=True)

        print("\n# where the time goes at T=1e6, B=64 (torch profiler, self CPU time per op, one forward+backward)")
        inputs = make_inputs(10**6, 64)
        for which in ("reference", "cpp"):
            for name, option in (("luspo", "plain"), ("grpo", "tis+kl")):
                _set_backend(which)
                run_once(inputs, name, option)
                with quiet_profiler() as prof:
                    run_once(inputs, name, option)
                ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                total = sum(e.self_cpu_time_total for e in ops)
                top = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.2f}" for e in ops[:5])
                print(f"- {which} {name} {option}: {total / 1e3:.1f} ms in ops; top: {top}")


if __name__ == "__main__":
    main()
