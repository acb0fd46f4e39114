"""Batched sampling with a transformers model: the engine behind our SGLang-API server.

A batch of rows (one row = one sample of one request) runs through ``model.generate`` once:
transformers' own prefill/decode loop and KV cache, left-padded prompts. Each row may carry its own
temperature, top-p, top-k, stop ids, length and seed. transformers' sampling warpers take one value
per call, so row-wise sampling is a LogitsProcessor of ours (``_RowSampler``) and greedy selection
picks the token it chose; row-wise stopping is a StoppingCriteria (``_RowStopper``). Both are
transformers' documented extension points; the per-step work is vectorised over the batch.

Log-probs (docs/design.md §4 and :mod:`luspo_megatron.rollout.engine`): the sampler sees the float32
logits of the last position and records ``log_softmax(logits / T)[y]`` before any truncation, which
is what a transformers forward pass of the same model assigns to the same tokens (tested to 1e-5).

Greedy rows: a temperature below ``GREEDY_BELOW`` = 1e-6 (sglang's ``_SAMPLING_EPS``, under which
sglang sets T = 1 and top_k = 1) is greedy. The token is ``argmax(logits)`` and its log-prob is
``log_softmax(logits)[y]``, the T = 1 value, finite. Dividing by such a temperature instead would
overflow float32 (T = 1e-38 gave NaN log-probs).

Reproducibility: row r draws its uniforms from its own ``torch.Generator`` seeded from the request,
one per decode step, so a seeded request samples the same tokens whatever else shares its batch
(up to float round-off of the batched logits, which is far below sampling resolution).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from luspo_megatron.rollout.engine import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP
from luspo_megatron.rollout.local import weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GREEDY_BELOW = 1e-6  # a temperature below this is greedy, with T = 1 log-probs (sglang's _SAMPLING_EPS)


@dataclass
class GenRow:
    """One sample to generate. ``top_k`` ≤ 0 means no top-k; ``temperature`` 0 means greedy."""

    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_ids: frozenset[int] = frozenset()
    want_routing: bool = False
    # Set from another thread (abort_request); read by the stopper between decode steps.
    aborted: threading.Event = field(default_factory=threading.Event)
    abort_message: str = "Abort in running batch"
    finished: bool = False  # set by the stopper once the row's finish is decided (the row stops counting as running)
    rid: str = ""  # the request it belongs to (server bookkeeping only)


@dataclass
class GenResult:
    tokens: list[int]
    logp: list[float]
    finish: str
    matched: int | None = None
    routed_experts: np.ndarray | None = None  # int32 [prompt_len + len(tokens) - 1, layers, top_k]


BLOCK = 256  # inverse-CDF block size: two cumulative sums of ~√V instead of one over V (V = 151,936)
NUCLEUS_CANDIDATES = 1024  # top-p rows first look for their nucleus among this many tokens


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Row-wise draw from ``probs`` [R, N] (non-negative, need not sum to 1) with ``uniform`` [R]
    in [0, 1): the first index whose cumulative mass exceeds ``uniform · total``.

    Two levels, so that only block sums (one pass over V) and one block's cumulative sum are
    needed, in float64: a float32 cumsum over 152k entries would drift by ~1e-4 relative.
    A zero-probability index is never returned (the search is strict, ``right=True``).
    """
    rows, n = probs.shape
    full = n // BLOCK * BLOCK
    sums = probs[:, :full].reshape(rows, -1, BLOCK).sum(-1)
    if full < n:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=1)
    block_cdf = sums.double().cumsum(-1)  # [R, nb]
    target = uniform.to(block_cdf) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target[:, None]))
    cols = block * BLOCK + torch.arange(BLOCK, device=probs.device)  # [R, BLOCK]
    inside = cols < n
    values = probs.gather(1, cols.clamp(max=n - 1)) * inside
    inner = values.double().cumsum(-1)
    pick = torch.searchsorted(inner, target[:, None] - before, right=True)
    # Round-off can put the target past the block's last positive entry: take that entry instead.
    last = torch.where(values > 0, torch.arange(BLOCK, device=probs.device), -1).max(-1, keepdim=True).values
    return (block * BLOCK + torch.minimum(pick, last))[:, 0]


class _RowSampler(LogitsProcessor):
    """Samples one token per row with the row's own parameters and RNG; records its log-prob.

    Fills ``scores`` with −inf except at the chosen token, so transformers' greedy step
    (``do_sample=False``) appends exactly our choice.
    """

    def __init__(self, rows: list[GenRow], device: torch.device) -> None:
        self.temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float64, device=device)
        self.greedy = self.temperature < GREEDY_BELOW  # 0 and anything that would overflow logits / T
        self.temperature[self.greedy] = 1.0  # greedy rows report log_softmax(logits), T = 1
        self.temperature = self.temperature.float()
        self.top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([max(r.top_k, 0) for r in rows], dtype=torch.long, device=device)
        truncated = ((self.top_p < 1) | (self.top_k > 0)) & ~self.greedy
        self.truncated = truncated.nonzero()[:, 0]
        self.plain = (~truncated & ~self.greedy).nonzero()[:, 0]
        self.any_greedy = bool(self.greedy.any())
        self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]
        self.tokens: list[torch.Tensor] = []  # per step: [B]
        self.logp: list[torch.Tensor] = []  # per step: [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # ``scores`` is transformers' float32 copy of the last position's logits, ours to overwrite.
        scaled = scores.div_(self.temperature[:, None])  # [B, V], in place: logits / T
        probs = torch.softmax(scaled, dim=-1)  # one fused pass; float32 keeps full relative precision
        # One uniform per row and step from the row's own generator: batch-independent draws.
        uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        uniform = uniform.to(scores.device)
        pick = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        if self.plain.numel():
            pick[self.plain] = inverse_cdf(probs[self.plain], uniform[self.plain])
        if self.truncated.numel():
            pick[self.truncated] = self._truncated(probs[self.truncated], uniform[self.truncated],
                                                   self.top_k[self.truncated], self.top_p[self.truncated])
        if self.any_greedy:
            pick = torch.where(self.greedy, scaled.argmax(dim=-1), pick)
        self.tokens.append(pick)
        # The recorded log-prob is log_softmax(logits / T)[y], before truncation (engine.py). A
        # sampled token has probability > 0, so its log is finite and accurate to float32 rounding.
        self.logp.append(probs.gather(1, pick[:, None])[:, 0].log())
        return scores.fill_(float("-inf")).scatter_(1, pick[:, None], 0.0)

    @staticmethod
    def _truncated(
        probs: torch.Tensor, uniform: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
    ) -> torch.Tensor:
        """top-k, then top-p (nucleus): on the sorted distribution keep a token while the mass
        strictly before it is < p, which always keeps the most likely one.

        transformers' warpers take one top-k / top-p per call, not per row, hence our own. Sorting
        all of V per row is slow, so candidates come from ``topk``: exact when the row's top-k fits,
        or when the candidates' mass already reaches top_p; rows where neither holds are sorted fully.
        """
        vocab = probs.shape[-1]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        width = min(vocab, max(int(k.max()) if bool((top_k > 0).all()) else NUCLEUS_CANDIDATES, 1))
        values, order = probs.topk(width, dim=-1)  # sorted, descending
        needs_all = (k > width) & (values.sum(-1) < top_p)
        if bool(needs_all.any()):
            values, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(values.shape[-1], device=probs.device)
        keep = (rank[None, :] < k[:, None]) & ((values.cumsum(-1) - values) < top_p[:, None])
        return order.gather(1, inverse_cdf(values * keep, uniform)[:, None])[:, 0]


class _RowStopper(StoppingCriteria):
    """Per-row stop: a stop id (finish "stop"), the row's own length ("length"), or an abort."""

    def __init__(self, rows: list[GenRow], on_step=None) -> None:
        self.rows = rows
        self.steps = 0
        self.on_step = on_step  # called after every decode step: the server's sign of progress
        self.finish: list[tuple[str, int, int | None] | None] = [None] * len(rows)  # (reason, n_tokens, matched)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.steps += 1
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if self.finish[i] is not None:
                continue
            if row.aborted.is_set():
                self.finish[i] = (FINISH_ABORT, self.steps, None)
            elif last[i] in row.stop_ids:
                self.finish[i] = (FINISH_STOP, self.steps, last[i])
            elif self.steps >= row.max_new_tokens:
                self.finish[i] = (FINISH_LENGTH, self.steps, None)
            row.finished = self.finish[i] is not None
        if self.on_step is not None:
            self.on_step()
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)


class _RoutingRecorder:
    """Records the experts each router picks (forward hooks on transformers' MoE TopKRouter modules)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        self.steps: list[list[torch.Tensor]] = []  # per forward: per layer [B*S, top_k]
        self._handles = []

    def __enter__(self) -> _RoutingRecorder:
        current: dict[int, torch.Tensor] = {}

        def hook(layer: int):
            def record(module, inputs, output):
                current[layer] = output[2].detach().to("cpu", torch.int32)
                if len(current) == len(self.routers):
                    self.steps.append([current[i] for i in range(len(self.routers))])
                    current.clear()
            return record

        self._handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def per_row(self, batch: int, pad: list[int], prompt_lens: list[int], n_tokens: list[int]) -> list[np.ndarray]:
        """[prompt_len + n − 1, layers, top_k] for each row: prefill positions, then one per decode step."""
        prefill = torch.stack([t.view(batch, -1, t.shape[-1]) for t in self.steps[0]], dim=2)  # [B, S, L, k]
        decode = [torch.stack([t.view(batch, t.shape[-1]) for t in step], dim=1) for step in self.steps[1:]]
        out = []
        for i in range(batch):
            rows = [prefill[i, pad[i]:]] + [d[i][None] for d in decode[: max(n_tokens[i] - 1, 0)]]
            out.append(torch.cat(rows, dim=0).numpy())
            assert out[-1].shape[0] == prompt_lens[i] + n_tokens[i] - 1
        return out


class TransformersGenerator:
    """A causal LM from an HF directory, generating batches of :class:`GenRow`. Not thread-safe:
    the server runs every call on one worker thread."""

    def __init__(self, hf_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model, self.eos_ids = self._load(hf_dir)
        self.model_path = str(hf_dir)
        config = self.model.config
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        self.vocab_size = int(config.vocab_size)
        # Tensor names and shapes of the directory we started from: what every later update must hold
        # (names the model has no parameter for are skipped, now and in every update).
        layout = weight_files.read_layout(hf_dir)
        params = dict(self.model.named_parameters())
        self.layout = layout.without({n for n in layout.shapes if _fused_target(n, params)[0] is None})
        self.last_step = time.monotonic()  # when a decode step last finished (health checks read it)

    def _load(self, hf_dir: str | Path) -> tuple[torch.nn.Module, frozenset[int]]:
        """The model, and the ids that end a response unless ``ignore_eos`` (SGLang stops on them too)."""
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=self.dtype).to(self.device).eval()
        eos = model.generation_config.eos_token_id or model.config.eos_token_id
        # The directory's generation_config.json (Qwen3 ships do_sample/temperature/top_p there) would
        # be merged into every generate call; our sampler owns all of that, so start from a blank one.
        model.generation_config = GenerationConfig()
        return model, frozenset([eos] if isinstance(eos, int) else (eos or []))

    def model_facts(self) -> dict:
        config = self.model.config
        return {"model_type": config.model_type, "architectures": list(config.architectures or [])}

    def reload(self, hf_dir: str | Path, allowed: tuple[Path, ...] | None = None) -> None:
        """Replace the weights with those of another HF directory of the served model, all or nothing.

        The tensors are copied into the live model, as SGLang's ``update_weights_from_disk`` does
        (≈ 10× cheaper than ``from_pretrained``, docs/benchmarks.md §5). The directory must hold every
        parameter with the served names, shapes and vocabulary (:mod:`.weight_files`); otherwise
        :class:`~.weight_files.WeightUpdateRefused` names the first problem and nothing changes."""
        named = weight_files.read_checkpoint(str(hf_dir), self.layout, allowed)
        self.load_full_state(named)
        self.model_path = str(hf_dir)

    @torch.no_grad()
    def generate(self, rows: list[GenRow]) -> list[GenResult]:
        batch = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        pad = [width - len(r.prompt_ids) for r in rows]
        input_ids = torch.tensor([[self.pad_id] * p + r.prompt_ids for p, r in zip(pad, rows)], device=self.device)
        attention_mask = torch.tensor([[0] * p + [1] * len(r.prompt_ids) for p, r in zip(pad, rows)],
                                      device=self.device)
        sampler, stopper = _RowSampler(rows, self.device), _RowStopper(rows, on_step=self._heartbeat)
        recorder = _RoutingRecorder(self.model) if any(r.want_routing for r in rows) else None
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max(r.max_new_tokens for r in rows),
            eos_token_id=None, pad_token_id=self.pad_id,
        )
        if recorder is not None:
            with recorder:
                self._run(input_ids, attention_mask, config, sampler, stopper)
        else:
            self._run(input_ids, attention_mask, config, sampler, stopper)
        tokens = torch.stack(sampler.tokens, dim=1).tolist()  # [B, steps]
        logp = torch.stack(sampler.logp, dim=1).tolist()
        results = []
        for i in range(batch):
            reason, n, matched = stopper.finish[i] or (FINISH_ABORT, stopper.steps, None)
            results.append(GenResult(tokens=tokens[i][:n], logp=logp[i][:n], finish=reason, matched=matched))
        if recorder is not None and recorder.routers:
            routed = recorder.per_row(batch, pad, [len(r.prompt_ids) for r in rows], [len(x.tokens) for x in results])
            for row, result, experts in zip(rows, results, routed):
                if row.want_routing:
                    result.routed_experts = experts
        return results

    def _heartbeat(self) -> None:
        self.last_step = time.monotonic()

    def _run(self, input_ids, attention_mask, config, sampler, stopper) -> None:
        self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            logits_processor=LogitsProcessorList([sampler]), stopping_criteria=StoppingCriteriaList([stopper]),
        )

    @torch.no_grad()
    def load_full_state(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors that together cover every parameter exactly once into the live model;
        ValueError (the model untouched) for an unknown name, a shape mismatch, a non-float tensor, a
        duplicate or a parameter left out."""
        params = dict(self.model.named_parameters())
        if "lm_head.weight" not in params and any(n == "model.embed_tokens.weight" for n, _ in named):
            named = [(n, t) for n, t in named if n != "lm_head.weight"]  # tied: the embedding is the head
        plan = _copy_plan(named, params)
        covered: dict[int, int] = {}  # id(parameter) -> elements the tensors provide for it
        for target, view, _ in plan:
            covered[id(target)] = covered.get(id(target), 0) + view.numel()
        # Distinct names map to disjoint views (whole tensors, or one expert's gate / up / down
        # block), so equal element counts mean every element of every parameter is written once.
        unique = {id(p): (n, p) for n, p in params.items()}  # tied parameters appear once
        missing = [n for k, (n, p) in unique.items() if covered.get(k, 0) != p.numel()]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) not covered exactly, e.g. {missing[0]}")
        for _, view, tensor in plan:
            view.copy_(tensor.to(view.device, view.dtype))

    @torch.no_grad()
    def load_named_tensors(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-checkpoint-named tensors into the live model; returns how many were loaded.

        Checkpoints (and SGLang's weight-update APIs) name experts one by one
        (``mlp.experts.{e}.gate_proj.weight``), while transformers 5 keeps them fused in memory
        (``gate_up_proj`` [E, 2·I, H] with gate first, ``down_proj`` [E, H, I]; offline_deps.md §2.2).
        transformers converts only when it loads whole files, so partial updates are mapped here.
        """
        plan = _copy_plan(named, self._targets())
        for _, view, tensor in plan:
            view.copy_(tensor.to(view.device, view.dtype))
        return len(plan)

    def check_named_shapes(self, names: list[str], shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> None:
        """ValueError, naming the tensor, unless :meth:`load_named_tensors` would accept tensors of these
        names, shapes and dtypes (checked before any are received: /update_weights_from_distributed)."""
        _copy_plan([(n, torch.empty(s, dtype=d, device="meta")) for n, s, d in zip(names, shapes, dtypes)],
                   self._targets())

    def parameter(self, name: str) -> torch.Tensor:
        """The live tensor an HF checkpoint name refers to (one expert's block of a fused parameter,
        the embedding for a tied ``lm_head.weight``); ValueError naming it when the model has none."""
        target, index = _fused_target(name, dict(self.model.named_parameters()))
        if target is None:
            raise ValueError(f"name: unknown parameter {name!r} (expected a Hugging Face checkpoint name of the "
                             "served model)")
        return target if index is None else target[index]

    def _targets(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        return params


def _copy_plan(named: list[tuple[str, torch.Tensor]], params: dict[str, torch.Tensor]):
    """(parameter, the view of it a checkpoint tensor fills, that tensor) for each named tensor;
    ValueError naming the tensor for an unknown or repeated name, a shape mismatch or a tensor that
    is not floating point, before anything is copied."""
    plan, seen = [], set()
    for name, tensor in named:
        target, index = _fused_target(name, params)
        if target is None:
            raise ValueError(f"unknown tensor {name}: not a parameter of the served model")
        if name in seen:
            raise ValueError(f"tensor {name} appears twice")
        seen.add(name)
        view = target if index is None else target[index]
        if tuple(view.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {list(tensor.shape)} differs from the served model's {list(view.shape)}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')} is not floating point")
        plan.append((target, view, tensor))
    return plan


def _fused_target(name: str, params: dict[str, torch.Tensor]):
    if name in params:
        return params[name], None
    if name == "lm_head.weight" and "lm_head.weight" not in params and "model.embed_tokens.weight" in params:
        return params["model.embed_tokens.weight"], None  # tied embeddings
    parts = name.split(".")
    # model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight
    if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit() and len(parts[-3]) < 10 \
            and parts[-1] == "weight":
        base, expert, proj = ".".join(parts[:-3]), int(parts[-3]), parts[-2]
        fused = params.get(f"{base}.gate_up_proj" if proj != "down_proj" else f"{base}.down_proj")
        if fused is None or expert >= fused.shape[0]:
            return None, None
        if proj in ("gate_proj", "up_proj"):  # gate_up_proj [E, 2I, H], gate first
            half = fused.shape[1] // 2
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            return fused, (expert, rows)
        if proj == "down_proj":  # down_proj [E, H, I]
            return fused, expert
    return None, None
