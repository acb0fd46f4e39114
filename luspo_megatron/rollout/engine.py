"""The rollout-engine protocol: what the trainer may ask of any engine (docs/design.md §4, steps 2 and 7).

An engine turns prompt token ids into sampled responses with the log-probs the sampler used, and
takes new weights. :class:`luspo_megatron.rollout.sglang.SGLangEngine` speaks SGLang's native HTTP
API (real SGLang servers, an sglang-router, or our own :mod:`luspo_megatron.rollout.local.server`);
:class:`luspo_megatron.rollout.local.inprocess.InProcessEngine` runs our generator in the trainer's
process. The trainer sees only this protocol, so it cannot tell them apart.

Log-prob convention (the trainer uses the same one): ``rollout_logp[t] = log_softmax(logits_t /
temperature)[y_t]``, before any top-p / top-k truncation. That is SGLang's convention too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from luspo_megatron.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from luspo_megatron.rollout.sync_plan import ShardReport, SyncPlan

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled. ``top_k=-1`` and ``top_p=1`` disable truncation.

    ``seed`` makes a generate call reproducible: the client derives one seed per (prompt, sample)
    from it, so the G samples of a prompt differ yet the whole call repeats exactly.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: expected ≥ 0, got {self.temperature!r}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a float in (0, 1], got {self.top_p!r}", field="top_p")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ConfigError(f"top_k: expected -1 or ≥ 1, got {self.top_k!r}", field="top_k")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}",
                              field="max_new_tokens")


@dataclass
class Sample:
    """One sampled response. ``rollout_logp[t]`` belongs to ``response_ids[t]``.

    ``finish`` is "stop" (a stop token ended it; the token is kept in ``response_ids``), "length"
    (``max_new_tokens`` reached) or "abort". ``routed_experts`` (routing replay, optional) is an
    int32 array [prompt_len + response_len − 1, num_layers, top_k]: the experts each input
    position was routed to.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]
    finish: str
    weight_version: str
    routed_experts: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finish not in FINISH_REASONS:
            raise ValueError(f"finish: expected one of {FINISH_REASONS}, got {self.finish!r}")
        if len(self.rollout_logp) != len(self.response_ids):
            raise ValueError(
                f"rollout_logp has {len(self.rollout_logp)} entries for {len(self.response_ids)} response tokens"
            )


WeightStream = Iterable[tuple[str, "torch.Tensor"]]
"""The policy's weights as (Hugging Face on-disk name, tensor) pairs, streamed (``parallel/export.py``)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer calls, and all it calls (``trainer/``). Synchronous; engines may run asyncio
    inside. Built by :func:`luspo_megatron.rollout.fleet.start_fleet`."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[list[Sample]]:
        """``n`` samples for each prompt: ``out[i][j]`` is sample j of ``prompts[i]``. Never drops one."""
        ...

    def wait_healthy(self, timeout_s: float) -> None:
        """Return once every server can generate, or raise RolloutError after ``timeout_s``."""
        ...

    def sync_weights(self, weights: WeightStream, weight_version: str) -> None:
        """Make the engines generate with ``weights`` from now on, tagged ``weight_version``: pause →
        flush → update → set the version → continue (continue also when the update fails). How the
        tensors travel (disk, tensor, distributed) is the engine's own configuration."""
        ...

    def weight_version(self) -> str:
        """The version of the weights the engine generates with now."""
        ...

    def health(self) -> bool:
        """True when every server can generate a token."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters for the trainer's metrics of the step (e.g. server restarts); may be empty."""
        ...

    def close(self) -> None:
        """Release the connections, threads and models the engine holds."""
        ...


@runtime_checkable
class ShardedWeightSync(Protocol):
    """An engine whose weight sync takes each trainer rank's own share (``rollout/updates.py``):
    the trainer calls :meth:`begin_weight_sync` on rank 0, every rank pushes what it owns with a
    ``rollout.push.ShardPusher``, and rank 0 calls :meth:`end_weight_sync` with every rank's report
    (``trainer/weights.py``). :meth:`RolloutEngine.sync_weights` stays the one-process form."""

    def begin_weight_sync(self, weight_version: str) -> SyncPlan:
        """Pause and flush the engines; the plan every rank pushes by."""
        ...

    def end_weight_sync(self, plan: SyncPlan, reports: list[ShardReport]) -> None:
        """Finish the sync and resume the engines (also when it failed: then a RolloutError)."""
        ...
