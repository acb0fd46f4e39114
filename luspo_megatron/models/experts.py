"""Grouped-GEMM experts for megatron.core's local MoE spec: every local expert in one kernel.

``GroupedExperts`` is megatron's ``SequentialMLP`` (it subclasses it: same ``local_experts.{e}``
MLP modules, same parameters, tensor-parallel attributes, ``sharded_state_dict`` and checkpoint
layout), with a forward that runs all local experts at once through ``torch._grouped_mm`` (public
as ``F.grouped_mm`` in newer torch; one CUTLASS kernel on sm_90 in bf16). ``models/build.py`` puts
it in the spec as the experts submodule of megatron's ``MoELayer``, no fork. So conversion
(``checkpoint/convert.py``, ``hf_map``), weight sync / export (``models/weights.py``) and old
checkpoints see exactly the names and tensors they see with ``SequentialMLP``.

Math, for the tokens the dispatcher permuted to this rank (sorted by local expert e, ``counts[e]``
rows each; with expert-TP each rank holds its slice of F and the dispatcher sums the partial
outputs, exactly as for ``SequentialMLP``):

    h = x_e · W1_eᵀ                   W1_e = [gate_e; up_e]  [2F, H]   (one grouped GEMM)
    a = (silu(h_gate) · h_up · p)     p = the token's routing probability (fp32), cast back
    y = a_e · W2_eᵀ                   W2_e [H, F]                        (one grouped GEMM)

and the backward of each grouped GEMM y = x_g·W_gᵀ: dx_g = dy_g·W_g (grouped, 2D × 3D) and
dW_g = dy_gᵀ·x_g (grouped, 2D × 2D over the token dimension); an expert with no tokens gets dW = 0.

Storage — stacked storage with per-expert names, not per-expert parameters stacked at forward
time. Each layer's per-expert weights are views into one [E, 2F, H] (fc1) and one [E, H, F] (fc2)
buffer, so the grouped kernel reads that buffer directly. Stacking at forward time would copy every
expert weight of the layer twice per micro-batch (forward, and again in backward unless the copy is
saved): at Qwen3-30B-A3B shapes a layer's experts are 3·128·2048·768 = 604 M weights = 1.2 GB in
bf16; by arithmetic (not measured), ≈ 0.6 ms of copy each way on an H200 (2.4 GB moved at ≈ 4 TB/s)
against ≈ 0.8 ms for the forward GEMMs of an 8k-token micro-batch (6.2·10¹¹ FLOP at ≈ 790 TFLOP/s),
and saving the copy for backward would hold 1.2 GB per layer per micro-batch in flight. The
parameters stay separate leaves with their own names (``param.data`` is a view), so DDP, the
optimizer and checkpointing are unchanged. Anything that re-points ``param.data`` breaks the
aliasing — megatron's distributed optimizer moves parameters into its own buffer, ``.cuda()``
copies them (handled: :meth:`GroupedExperts._apply` re-stacks) — and the forward then falls back to
stacking copies (one per GEMM, not saved for backward): always correct, only slower.

Kernel or loop: the kernel path needs a dtype/device that ``_grouped_mm`` supports (probed once per
device type and dtype against a per-expert matmul, so a build that computes silently wrong results
is refused; float64 and, on some builds, fp32 are not supported) and 16-byte aligned rows. Otherwise
the same grouped math runs as one matmul per expert (the "loop" backend), which is also what the
float64 parity tests exercise. ``GroupedExperts.impl = "sequential"`` runs megatron's own
``SequentialMLP.forward`` (the benchmark switches it at run time).

The upstream gradient is made contiguous before the backward GEMMs: ``_grouped_mm`` rejects an
expanded gradient (e.g. the stride-0 gradient of a ``.sum()``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

logger = logging.getLogger(__name__)

IMPLS = ("grouped", "sequential")
MM_BACKENDS = ("auto", "kernel", "loop")


def grouped_mm_op() -> Callable[..., torch.Tensor] | None:
    """``F.grouped_mm`` (newer torch) or ``torch._grouped_mm``; None when this torch has neither."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def kernel_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``_grouped_mm`` runs, and is exact, for ``dtype`` on ``device_type`` (both forms, with an
    empty group). Small-integer inputs make every product and sum exact in bf16, so any difference from
    the per-group matmul is a wrong kernel, not rounding."""
    op = grouped_mm_op()
    if op is None:
        return False
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else device_type
    try:
        gen = torch.Generator().manual_seed(0)
        counts = [3, 0, 5, 9]
        x = torch.randint(-2, 3, (sum(counts), 16), generator=gen).to(device, dtype)
        w = torch.randint(-2, 3, (len(counts), 32, 16), generator=gen).to(device, dtype)
        g = torch.randint(-2, 3, (sum(counts), 32), generator=gen).to(device, dtype)
        bounds = _bounds(counts)
        offs = torch.tensor([b for _, b in bounds], dtype=torch.int32, device=device)
        y = op(x, w.transpose(1, 2), offs=offs)
        dx = op(g, w, offs=offs)
        dw = op(g.t(), x, offs=offs)
        ok = (torch.equal(y, _loop_mm(x, w.transpose(1, 2), bounds))
              and torch.equal(dx, _loop_mm(g, w, bounds))
              and torch.equal(dw[torch.tensor(counts, device=device) > 0],
                              _loop_mm(g.t(), x, bounds)[torch.tensor(counts, device=device) > 0]))
    except (RuntimeError, TypeError, NotImplementedError) as err:
        logger.info("torch grouped_mm unavailable for %s on %s: %s", dtype, device_type, str(err).split("\n")[0])
        return False
    if not ok:
        logger.warning("torch grouped_mm gives wrong results for %s on %s: using a loop over experts", dtype,
                       device_type)
    return ok


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each group's rows."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def _loop_mm(a: torch.Tensor, b: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The grouped product as one matmul per group (``_grouped_mm``'s semantics):
    2D a [T, K] × 3D b [E, K, N] -> [T, N], rows of group g times b[g];
    2D a [N, T] × 2D b [T, K] -> [E, N, K], group g's columns of a times its rows of b."""
    if b.dim() == 3:
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(bounds)])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in bounds])


def _aligned(*sizes: int, element_size: int) -> bool:
    """The kernel's rows must start on 16-byte boundaries (TMA)."""
    return all((n * element_size) % 16 == 0 for n in sizes)


def stacked_view(params: list[torch.Tensor]) -> torch.Tensor | None:
    """[E, *shape] view of parameters that are consecutive slices of one contiguous buffer; None when
    they are not (then the caller stacks a copy)."""
    first = params[0]
    numel = first.numel()
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for e, p in enumerate(params):
        if (p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset + e * numel
                or not p.is_contiguous() or p.shape != first.shape):
            return None
    shape = (len(params), *first.shape)
    strides = (numel, *first.stride())
    return first.detach().as_strided(shape, strides, offset)


def stack_weights(params: list[torch.Tensor]) -> torch.Tensor:
    """The experts' weights as one [E, N, K] tensor: a view of the shared buffer, else a copy."""
    view = stacked_view(params)
    return view if view is not None else torch.stack([p.detach() for p in params])


class _Groups:
    """Group boundaries of one forward: host counts when known (CPU ``tokens_per_expert``, which is
    what megatron's alltoall dispatcher hands over, also on a GPU), and int32 end offsets on the
    device for the kernel."""

    def __init__(self, tokens_per_expert: torch.Tensor, device: torch.device, total: int):
        counts = tokens_per_expert.detach()
        self.host = counts.device.type == "cpu"
        self.counts = counts.tolist() if self.host else None
        if self.host and sum(self.counts) != total:
            raise ValueError(f"GroupedExperts: tokens_per_expert sums to {sum(self.counts)}, "
                             f"the permuted input has {total} rows")
        if self.host and device.type == "cuda":
            counts = counts.pin_memory()  # an asynchronous copy: no host sync
        self.device_counts = counts.to(device, non_blocking=True)
        self.offs = torch.cumsum(self.device_counts, 0).to(torch.int32)  # group g: rows offs[g-1]:offs[g]

    def bounds(self) -> list[tuple[int, int]]:
        if self.counts is None:  # device counts: the loop needs them on the host (one sync)
            self.counts = self.device_counts.tolist()
        return _bounds(self.counts)

    def zero_empty_(self, grad_w: torch.Tensor) -> None:
        """dW = 0 for experts without tokens (some grouped-GEMM builds leave such slices unwritten)."""
        if self.counts is not None:
            for e, n in enumerate(self.counts):
                if n == 0:
                    grad_w[e].zero_()  # only that expert's slice; no host-to-device index copy
        else:
            grad_w.masked_fill_((self.device_counts == 0)[:, None, None], 0)


class _GroupedLinear(torch.autograd.Function):
    """y = x_g · W_gᵀ for each expert's rows; weights passed one per expert (the parameters), read
    through their shared buffer; nothing but the inputs is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: _Groups, kernel: bool, *weights: torch.Tensor) -> torch.Tensor:
        w = stack_weights(list(weights))  # [E, N, K]
        ctx.groups, ctx.kernel = groups, kernel
        ctx.save_for_backward(x, *weights)
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[1])
        if kernel:
            return grouped_mm_op()(x, w.transpose(1, 2), offs=groups.offs)  # [T, N]
        return _loop_mm(x, w.transpose(1, 2), groups.bounds())

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *weights = ctx.saved_tensors
        groups: _Groups = ctx.groups
        grad_y = grad_y.contiguous()  # _grouped_mm rejects expanded (stride-0) gradients
        grad_x = grad_w = None
        want_w = any(ctx.needs_input_grad[3:])
        if x.shape[0] == 0:
            grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            grad_w = x.new_zeros(len(weights), *weights[0].shape) if want_w else None
        else:
            mm = functools.partial(grouped_mm_op(), offs=groups.offs) if ctx.kernel else None
            if ctx.needs_input_grad[0]:
                w = stack_weights(weights)  # [E, N, K]
                grad_x = mm(grad_y, w) if mm else _loop_mm(grad_y, w, groups.bounds())  # dx_g = dy_g · W_g
            if want_w:
                # dW_g = dy_gᵀ · x_g  [E, N, K]
                grad_w = mm(grad_y.t(), x) if mm else _loop_mm(grad_y.t(), x, groups.bounds())
                groups.zero_empty_(grad_w)
        grads_w = grad_w.unbind(0) if grad_w is not None else (None,) * len(weights)
        return (grad_x, None, None, *grads_w)


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` with one grouped GEMM per projection (module docstring). Built by megatron's
    ``build_module`` from the local MoE spec: ``(num_local_experts, config, submodules, pg_collection)``."""

    impl: str = "grouped"  # "sequential": megatron's SequentialMLP.forward (per instance, switchable)
    mm_backend: str = "auto"  # "kernel" | "loop" | "auto": kernel where supported and aligned

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self._restack()

    # ------------------------------------------------------------------------------------ storage
    def _weights(self, name: str) -> list[torch.nn.Parameter]:
        return [getattr(expert, name).weight for expert in self.local_experts]

    @torch.no_grad()
    def _restack(self) -> None:
        """Make each projection's per-expert weights views of one contiguous [E, ...] buffer
        (values unchanged); a no-op when they already are."""
        for name in ("linear_fc1", "linear_fc2"):
            params = self._weights(name)
            if stacked_view(params) is not None:
                continue
            first = params[0]
            buffer = torch.empty((len(params), *first.shape), dtype=first.dtype, device=first.device)
            for e, p in enumerate(params):
                buffer[e].copy_(p.data)
                p.data = buffer[e]

    def _apply(self, fn, recurse=True):
        # .cuda() / .to() / .bfloat16() give every parameter new storage: stack it again.
        out = super()._apply(fn, recurse)
        self._restack()
        return out

    def weights_stacked(self) -> bool:
        """Whether the forward reads the weights without copying them (see the module docstring)."""
        return all(stacked_view(self._weights(n)) is not None for n in ("linear_fc1", "linear_fc2"))

    # ------------------------------------------------------------------------------------ forward
    def _supported_config(self) -> bool:
        c = self.config
        return not (c.fp8 or c.fp4 or c.add_bias_linear or c.bias_activation_fusion or c.use_te_activation_func
                    or c.moe_apply_probs_on_input or getattr(c, "moe_latent_size", None))

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.mm_backend == "loop":
            return False
        fc1 = self.local_experts[0].linear_fc1.weight  # [2F, H]
        fc2 = self.local_experts[0].linear_fc2.weight  # [H, F]
        ok = (_aligned(*fc1.shape, *fc2.shape, element_size=x.element_size())
              and kernel_supported(x.device.type, x.dtype))
        if self.mm_backend == "kernel" and not ok:
            raise RuntimeError(f"GroupedExperts: torch grouped_mm cannot run {x.dtype} on {x.device.type} "
                               f"with these shapes (mm_backend='kernel')")
        return ok

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """x [T, H] sorted by local expert, tokens_per_expert [E], probs [T] -> ([T, H], None)."""
        if self.impl == "sequential" or not self._supported_config():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        if self.impl != "grouped":
            raise ValueError(f"GroupedExperts.impl: expected one of {IMPLS}, got {self.impl!r}")
        x = permuted_local_hidden_states
        assert x.dim() == 2 and permuted_probs.shape == x.shape[:1], (x.shape, permuted_probs.shape)
        assert tokens_per_expert.numel() == self.num_local_experts, tokens_per_expert.shape
        groups = _Groups(tokens_per_expert, x.device, x.shape[0])
        kernel = self._use_kernel(x)
        h = _GroupedLinear.apply(x, groups, kernel, *self._weights("linear_fc1"))  # [T, 2F]
        a = self._glu(h)  # [T, F]
        original_dtype = a.dtype
        a = (a * permuted_probs.unsqueeze(-1)).to(original_dtype)  # as MLP: fp32 probs, cast back
        y = _GroupedLinear.apply(a, groups, kernel, *self._weights("linear_fc2"))  # [T, H]
        return y, None

    def _glu(self, h: torch.Tensor) -> torch.Tensor:
        """megatron MLP's unfused activation, expression for expression (same rounding)."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)


def set_expert_impl(chunks: list[torch.nn.Module], impl: str) -> int:
    """Switch every :class:`GroupedExperts` of ``chunks`` to ``impl`` ("grouped" | "sequential");
    returns how many were switched (0: the model has no grouped experts)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, GroupedExperts):
                module.impl = impl
                count += 1
    return count
