"""Where a training step's time goes, by torch.profiler: experts, attention, router/dispatch, log-probs
+ loss, optimizer, everything else. Used by ``bench_train_step.py``.

How time is attributed: named profiler ranges (``record_function``) bracket each part, forward and
backward, and every profiled op's *self* time (its kernels' device time on a GPU, its CPU time on a
CPU) goes to the innermost range around it; ops outside every range are "other" (projections,
norms, embedding, DDP, ...). Ranges:

    experts          the MoE experts module (grouped or sequential), forward and backward
    attention        core attention (softmax(QKᵀ)V; not the q/k/v/o projections)
    router/dispatch  the MoE layer minus its experts: router, permutation, token all-to-all
    log-probs + loss the output layer (logits), vocab-parallel log-softmax, the policy loss
    optimizer        gradient norm, clipping and the AdamW update (``parallel.train._optimizer_step``)

Forward ranges are module forward hooks. Backward ranges are opened by a hook on the module's
output gradient (the module's backward starts when it is ready) and closed by a hook on its input
gradient (it ends when that is computed); both run on the autograd engine's thread, where the
backward ops run, so the ranges nest like the backward itself. The loss and the optimizer step are
wrapped by name in ``parallel.train`` for the profiled step only.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function

PREFIX = "bench::"
CATEGORIES = ("experts", "attention", "router_dispatch", "logprobs_loss", "optimizer", "other")
LABELS = {"experts": "experts", "attention": "attention (core)", "router_dispatch": "router/dispatch",
          "logprobs_loss": "log-probs + loss", "optimizer": "optimizer", "other": "other"}


class _Ranges:
    """Backward ranges opened and closed from autograd hooks (LIFO per name)."""

    def __init__(self):
        self.open_ranges: dict[str, list] = defaultdict(list)

    def open(self, name: str) -> None:
        rf = record_function(PREFIX + name)
        rf.__enter__()
        self.open_ranges[name].append(rf)

    def close(self, name: str) -> None:
        if self.open_ranges[name]:
            self.open_ranges[name].pop().__exit__(None, None, None)

    def close_all(self) -> None:
        for stack in self.open_ranges.values():
            while stack:
                stack.pop().__exit__(None, None, None)


def _first_tensor(value):
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if torch.is_tensor(v)), None)
    return None


def _hook_module(module: torch.nn.Module, name: str, ranges: _Ranges, forward_only_range: bool = False) -> list:
    """Forward range around ``module``; backward range from its output gradient to its input gradient
    (``forward_only_range``: the input gradient closes ``name``'s backward range, opened elsewhere)."""
    state = {}

    def pre(mod, args):
        rf = record_function(PREFIX + name)
        rf.__enter__()
        state.setdefault("forward", []).append(rf)
        x = _first_tensor(args)
        if x is not None and x.requires_grad and torch.is_grad_enabled():
            x.register_hook(lambda grad: ranges.close(name))

    def post(mod, args, output):
        if state.get("forward"):
            state["forward"].pop().__exit__(None, None, None)
        y = _first_tensor(output)
        if not forward_only_range and y is not None and y.requires_grad and torch.is_grad_enabled():
            y.register_hook(lambda grad: ranges.open(name))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextlib.contextmanager
def category_ranges(chunks: list[torch.nn.Module]):
    """Install the ranges of the module docstring on ``chunks`` (unwrapped GPTModels) for one step."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from luspo_megatron.models.attention import PackedDotProductAttention
    from luspo_megatron.parallel import train

    ranges = _Ranges()
    handles = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                handles += _hook_module(module, "router_dispatch", ranges)
                handles += _hook_module(module.experts, "experts", ranges)
            elif isinstance(module, PackedDotProductAttention):
                handles += _hook_module(module, "attention", ranges)
        output_layer = getattr(chunk, "output_layer", None)
        if output_layer is not None:  # its input gradient ends the log-probs + loss backward range
            handles += _hook_module(output_layer, "logprobs_loss", ranges, forward_only_range=True)
    original_loss, original_step = train._loss, train._optimizer_step

    def loss(ctx, mb, output):
        with record_function(PREFIX + "logprobs_loss"):
            value, metrics = original_loss(ctx, mb, output)
        if value.requires_grad:
            value.register_hook(lambda grad: ranges.open("logprobs_loss"))
        return value, metrics

    def optimizer_step(optimizer):
        with record_function(PREFIX + "optimizer"):
            return original_step(optimizer)

    train._loss, train._optimizer_step = loss, optimizer_step
    try:
        yield
    finally:
        train._loss, train._optimizer_step = original_loss, original_step
        ranges.close_all()
        for handle in handles:
            handle.remove()


def _category(event) -> str:
    node = event
    while node is not None:
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX):]
        node = node.cpu_parent
    return "other"


def breakdown(prof, cuda: bool) -> dict[str, float]:
    """Seconds of self time per category (device time of kernels on a GPU, CPU time on a CPU)."""
    from torch.autograd import DeviceType

    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.name.startswith(PREFIX) or getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue  # a range's own time is its children's; kernels count through the op that launched them
        if cuda:
            us = getattr(event, "self_device_time_total", None)
            us = getattr(event, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = event.self_cpu_time_total
        category = _category(event)
        totals[category if category in totals else "other"] += us / 1e6
    return totals


def profile_step(run_step, chunks: list[torch.nn.Module], cuda: bool) -> tuple[dict[str, float], float]:
    """Run ``run_step()`` once under torch.profiler with the category ranges: (seconds per category,
    wall seconds of the step)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with category_ranges(chunks), profile(activities=activities) as prof:
        start = time.perf_counter()
        run_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return breakdown(prof, cuda), wall
