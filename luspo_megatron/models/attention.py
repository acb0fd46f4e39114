"""Core attention for the local (no Transformer Engine) spec, with packed THD sequences and CP.

Why this exists: megatron.core's local ``DotProductAttention`` rejects ``packed_seq_params`` and
asserts ``context_parallel_size == 1`` (both "only supported by TEDotProductAttention"). RL batches
are packed (THD), and CPU tests must exercise CP, so the local spec gets this module instead. With
Transformer Engine (GPU) the TE spec's ``TEDotProductAttention`` is used and this is never built.

Math, per packed token q of sequence i at position p (within its padded sequence):

    out_q = Σ_k softmax_k( q·k / √d  over keys k of sequence i with position ≤ p ) · v_k

GQA repeats each key/value head for its query heads. Backends (``--attention-backend``), all the
same math on packed THD micro-batches:

    auto       cp > 1: the CP path below. CUDA with bf16/fp16: varlen when this torch has it and a
               one-time probe passes, else causal. Otherwise (CPU, fp32): padded.
    padded     the sequences scattered into a padded [B, L] batch, cast to fp32, SDPA with an explicit
               causal+length mask (work Σ_i L_max², not the (Σ_i L_i)² of one mask over the pack);
               reads the boundaries on the host. The CPU / fp32 path.
    causal     the same padded batch in the input dtype and SDPA with ``is_causal=True`` and no mask
               (padding sits after every real token, so causality alone hides it), the layout built
               on the device from ``cu_seqlens`` and the host-side ``max_seqlen``: no host sync, and
               eligible for SDPA's flash kernel on CUDA in bf16/fp16.
    varlen     ``torch.nn.attention.varlen.varlen_attn`` (flash) on the packed tensors with the
               ``cu_seqlens`` we carry: no padding, no host sync. CUDA, bf16/fp16 only. Its signature
               changed between torch releases (``is_causal`` vs ``window_size=(-1, 0)``; ``scale`` and
               ``enable_gqa`` added later); :func:`varlen_attention` reads it at run time.
    reference  one dense masked softmax over the whole pack in fp32 (O(T²) memory): for tests.

Context parallel (Megatron's zigzag layout: each sequence of padded length L is cut into 2·cp
chunks of L/(2·cp); rank r holds chunks r and 2·cp−1−r): the keys and values of every CP rank are
all-gathered (Megatron's own ``gather_from_sequence_parallel_region`` over the CP group: all-gather
forward, reduce-scatter backward), and the causal mask uses each token's global position. This is
the "all-gather" CP variant (the reference formulation); it is exact, and cheap enough for the tiny
CPU models it serves. Only ``auto`` and ``reference`` run with cp > 1.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from luspo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "padded", "causal", "varlen", "reference")
_HALF = (torch.bfloat16, torch.float16)


def zigzag_positions(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position in the sequence) of every token a CP rank holds, in its local order.

    ``cu_seqlens_padded`` are the GLOBAL boundaries (every length a multiple of 2·cp)."""
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).tolist()
    seq_ids, positions = [], []
    for seq, length in enumerate(lengths):
        chunk = length // (2 * cp_size)
        if cp_size == 1:
            pos = torch.arange(length)
        else:
            pos = torch.cat([
                torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk),
            ])
        positions.append(pos)
        seq_ids.append(torch.full_like(pos, seq))
    return torch.cat(seq_ids), torch.cat(positions)


# ------------------------------------------------------------------------------------------- varlen
def varlen_function() -> Callable[..., torch.Tensor] | None:
    """``torch.nn.attention.varlen.varlen_attn`` or None (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=8)
def _parameter_names(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Causal varlen attention, whatever this torch's ``varlen_attn`` signature: q [t, h, d],
    k/v [t, g, d], ``cu_seqlens`` int32 [B+1] on the device -> [t, h, d]."""
    fn = fn or varlen_function()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available in this torch")
    names = _parameter_names(fn)
    kwargs = {}
    if "window_size" in names:  # torch ≥ 2.12: (-1, 0) is causal
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in names:  # torch 2.10 / 2.11
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(f"varlen_attn{inspect.signature(fn)}: neither window_size nor is_causal")
    heads, groups, dim = query.shape[1], key.shape[1], query.shape[2]
    if heads != groups:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:  # older torch: repeat each key/value head for its query heads
            key = key.repeat_interleave(heads // groups, dim=1)
            value = value.repeat_interleave(heads // groups, dim=1)
    if "scale" in names:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(dim), rel_tol=1e-12):
        query = query * (scale * math.sqrt(dim))  # the kernel's own scale is 1/√d
    cu = cu_seqlens.to(torch.int32)
    return fn(query.contiguous(), key.contiguous(), value.contiguous(), cu, cu, max_seqlen, max_seqlen, **kwargs)


@functools.cache
def varlen_supported(device_type: str, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    """Whether varlen attention runs here and matches a plain causal softmax (forward and backward,
    two sequences of different lengths); probed once per (device type, dtype, head dim, GQA)."""
    if varlen_function() is None or device_type != "cuda" or dtype not in _HALF:
        return False
    try:
        with torch.enable_grad():  # the first forward may run under no_grad (log-probs)
            return _varlen_probe(dtype, head_dim, gqa)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        logger.info("varlen attention unavailable (%s, head_dim %d): %s", dtype, head_dim, str(err).split("\n")[0])
        return False


def _varlen_probe(dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    """One varlen forward + backward on CUDA against a float64 per-sequence causal softmax."""
    gen = torch.Generator().manual_seed(0)
    lengths, heads = [5, 11], 4
    groups = 2 if gqa else heads
    t = sum(lengths)
    q, k, v = (torch.randn(t, n, head_dim, generator=gen).to("cuda", dtype).requires_grad_()
               for n in (heads, groups, groups))
    cu = torch.tensor([0, lengths[0], t], dtype=torch.int32, device="cuda")
    out = varlen_attention(q, k, v, cu, max(lengths), 1.0 / math.sqrt(head_dim))
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # a dense upstream gradient
    (out.double() * weight.cuda()).sum().backward()
    grads = [x.grad.float() for x in (q, k, v)]
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = []
    for s, e in ((0, lengths[0]), (lengths[0], t)):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in ref_in)
        ks, vs = (x.repeat_interleave(heads // groups, dim=0) for x in (ks, vs))
        ref.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    ref = torch.cat(ref)
    (ref * weight.cuda()).sum().backward()
    ok = torch.allclose(out.double(), ref, rtol=5e-2, atol=3e-2) and all(
        torch.allclose(g.double(), r.grad, rtol=5e-2, atol=6e-2) for g, r in zip(grads, ref_in))
    if not ok:
        logger.warning("varlen attention disagrees with the causal softmax here: using the causal backend")
    return ok


def check_backend(backend: str, config: TransformerConfig) -> None:
    """Refuse, with one line naming ``--attention-backend``, a backend this model cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"--attention-backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}",
                          field="attention_backend")
    if config.context_parallel_size > 1 and backend not in ("auto", "reference"):
        raise ConfigError(f"--attention-backend: expected auto or reference with --context-parallel-size "
                          f"{config.context_parallel_size} (the all-gather CP path), got {backend!r}",
                          field="attention_backend")
    if backend == "varlen":
        if varlen_function() is None:
            raise ConfigError(f"--attention-backend: varlen needs torch.nn.attention.varlen (torch ≥ 2.10), "
                              f"this is torch {torch.__version__}", field="attention_backend")
        if not torch.cuda.is_available() or config.params_dtype not in _HALF:
            raise ConfigError(f"--attention-backend: varlen needs CUDA and --model-dtype bf16, got "
                              f"{'CUDA' if torch.cuda.is_available() else 'no CUDA'} and {config.params_dtype}",
                              field="attention_backend")


# ----------------------------------------------------------------------------------------- module
class PackedDotProductAttention(MegatronModule):
    """Drop-in ``core_attention`` of the local spec (same constructor and forward signature as
    megatron.core's ``DotProductAttention``) that understands THD packing and context parallel.
    ``backend`` (module docstring) comes from the spec's params; it may be changed at run time."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        if config.attention_dropout and (attention_dropout is None or attention_dropout > 0):
            raise ValueError("PackedDotProductAttention: attention dropout is not supported")
        check_backend(backend, config)
        self.backend = backend
        self.layer_number = layer_number
        self.pg_collection = pg_collection
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _cp_group(self, packed_seq_params: PackedSeqParams | None):
        if packed_seq_params is not None and packed_seq_params.cp_group is not None:
            return packed_seq_params.cp_group
        return getattr(self.pg_collection, "cp", None)

    def resolve_backend(self, query: torch.Tensor, key: torch.Tensor, cp_size: int) -> str:
        """The backend a THD forward of these tensors uses (``auto`` resolved)."""
        if self.backend != "auto":
            if cp_size > 1 and self.backend != "reference":
                raise ValueError(f"attention backend {self.backend!r} cannot run with cp = {cp_size}")
            return self.backend
        if cp_size > 1:
            return "reference"
        if query.is_cuda and query.dtype in _HALF:
            gqa = query.shape[1] != key.shape[1]
            return "varlen" if varlen_supported("cuda", query.dtype, query.shape[2], gqa) else "causal"
        return "padded"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedDotProductAttention: attention_bias is not supported")
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return self._forward_sbhd(query, key, value)
        return self._forward_thd(query, key, value, packed_seq_params)

    def _attend(self, q, k, v, allowed):
        """q [h, t, d], k/v [g, T, d] (g divides h), allowed [t, T] -> [t, h·d]."""
        heads, groups = q.shape[0], k.shape[0]
        if heads != groups:
            k = k.repeat_interleave(heads // groups, dim=0)
            v = v.repeat_interleave(heads // groups, dim=0)
        scores = torch.matmul(_at_least_fp32(q), _at_least_fp32(k).transpose(1, 2)) * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # [h, t, d]
        return out.transpose(0, 1).reshape(out.shape[1], -1)

    def _forward_thd(self, query, key, value, params: PackedSeqParams):
        # query [t, h, d], key/value [t, g, d] (Megatron squeezes the batch dim for THD).
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        group = self._cp_group(params)
        cp_size = group.size() if group is not None else 1
        backend = self.resolve_backend(query, key, cp_size)
        if backend == "varlen":
            out = varlen_attention(query, key, value, cu, _max_seqlen(params, cu), self.softmax_scale)
            return out.reshape(out.shape[0], -1)
        if backend == "causal":
            return self._attend_causal(query, key, value, cu, _max_seqlen(params, cu))
        cu = cu.detach().to("cpu", torch.long)
        cp_rank = group.rank() if group is not None else 0
        seq_q, pos_q = zigzag_positions(cu, cp_size, cp_rank)
        if seq_q.numel() != query.shape[0]:
            raise ValueError(f"THD attention: cu_seqlens cover {seq_q.numel()} tokens per rank, "
                             f"the packed tensor has {query.shape[0]}")
        if backend == "padded":
            return self._attend_padded(query, key, value, cu, seq_q, pos_q)
        if cp_size > 1:
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
            parts = [zigzag_positions(cu, cp_size, r) for r in range(cp_size)]
            seq_k = torch.cat([p[0] for p in parts])
            pos_k = torch.cat([p[1] for p in parts])
        else:
            seq_k, pos_k = seq_q, pos_q
        allowed = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
        allowed = allowed.to(query.device)
        return self._attend(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), allowed)

    def _attend_padded(self, query, key, value, cu, seq, pos):
        """Without CP: scatter the packed sequences into a padded [B, L] batch and run causal SDPA
        per sequence. Work is Σ_i L_max² instead of the (Σ_i L_i)² of one mask over the whole pack,
        which matters when a micro-batch packs hundreds of short RL responses."""
        lengths = cu[1:] - cu[:-1]
        num_seqs, max_len = lengths.numel(), int(lengths.max())
        seq, pos = seq.to(query.device), pos.to(query.device)

        def padded(x):  # [t, heads, d] -> [B, heads, L, d]
            out = x.new_zeros(num_seqs, max_len, *x.shape[1:])
            out = out.index_put((seq, pos), x)
            return out.transpose(1, 2)

        q, k, v = padded(_at_least_fp32(query)), padded(_at_least_fp32(key)), padded(_at_least_fp32(value))
        valid = torch.arange(max_len, device=query.device)[None, :] < lengths.to(query.device)[:, None]
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=query.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # [B, h, L, d]
        out = out.transpose(1, 2)[seq, pos]  # [t, h, d]
        return out.reshape(out.shape[0], -1).to(value.dtype)

    def _attend_causal(self, query, key, value, cu, max_len: int):
        """The padded batch in the input dtype, ``is_causal=True``, no mask; every index is computed on
        the device from ``cu`` (no host sync). Padding follows each sequence's real tokens, so a real
        query never sees it; padded query rows are dropped."""
        t, device = query.shape[0], query.device
        cu = cu.to(device=device, dtype=torch.long)
        num_seqs = cu.numel() - 1
        token = torch.arange(t, device=device)
        seq = torch.searchsorted(cu[1:], token, right=True)  # [t] sequence of each token
        pos = token - cu[seq]  # [t] its position in the sequence

        def padded(x):  # [t, heads, d] -> [B, heads, L, d]
            return x.new_zeros(num_seqs, max_len, *x.shape[1:]).index_put((seq, pos), x).transpose(1, 2)

        q, k, v = padded(query), padded(key), padded(value)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # [B, h, L, d]
        out = out.transpose(1, 2)[seq, pos]  # [t, h, d]
        return out.reshape(t, -1)

    def _forward_sbhd(self, query, key, value):
        # query [s, b, h, d] -> out [s, b, h·d]; plain causal attention per batch row.
        group = self._cp_group(None)
        if group is not None and group.size() > 1:
            raise ValueError("PackedDotProductAttention: context parallel needs packed (THD) inputs")
        s = query.shape[0]
        allowed = torch.ones(s, key.shape[0], dtype=torch.bool, device=query.device).tril()
        outs = [
            self._attend(query[:, b].transpose(0, 1), key[:, b].transpose(0, 1), value[:, b].transpose(0, 1), allowed)
            for b in range(query.shape[1])
        ]
        return torch.stack(outs, dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (the scores' precision); fp32 and float64 unchanged."""
    return x.float() if x.dtype in _HALF else x


def _max_seqlen(params: PackedSeqParams, cu: torch.Tensor) -> int:
    """The longest (padded) sequence: the host-side value the micro-batch carries; read from the device
    (one sync) only when it is missing."""
    value = params.max_seqlen_q
    if value is None:
        value = int((cu[1:] - cu[:-1]).max())
    return int(value)


def set_attention_backend(chunks: list[torch.nn.Module], backend: str) -> int:
    """Switch every :class:`PackedDotProductAttention` of ``chunks`` to ``backend`` (checked against the
    model's config); returns how many were switched."""
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, PackedDotProductAttention):
                check_backend(backend, module.config)
                module.backend = backend
                count += 1
    return count
