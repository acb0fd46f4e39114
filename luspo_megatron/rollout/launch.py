"""From a :class:`~luspo_megatron.config.RolloutConfig` to a ready engine: the trainer's one call.

    rollout = start_rollout(cfg.rollout, hf_dir="runs/x/hf_init", seed=cfg.seed, log_dir="runs/x")
    groups = rollout.engine.generate(prompt_ids, sampling_from_config(cfg.rollout, step_seed), n=G)
    ...
    rollout.close()

``--rollout-engine local`` starts ``--rollout-num-engines`` of our servers on free ports (the
embedded default, CPU or one GPU each); ``sglang`` connects to ``--sglang-url`` servers or one
``--sglang-router``. Either way the trainer gets an :class:`SGLangEngine`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.local import LocalServer, start_local_servers
from luspo_megatron.rollout.sglang import SGLangEngine


@dataclass
class Rollout:
    """The engine, and the local server processes it owns (empty for external SGLang)."""

    engine: SGLangEngine
    servers: list[LocalServer] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_rollout(
    config: Any, hf_dir: str | Path | None = None, *, seed: int = 0, log_dir: str | Path | None = None,
    routed_layout: tuple[int, int] | None = None,
) -> Rollout:
    """Start (local) or connect to (sglang) the rollout engines described by ``config``.

    ``hf_dir`` (local only) is the HF directory the servers load first; later weights arrive
    through ``engine.update_weights``. ``routed_layout=(num_layers, top_k)`` turns on routing
    replay (``--use-rollout-routing-replay``).
    """
    kwargs = dict(max_concurrency=config.max_concurrency, request_timeout_s=config.request_timeout_s,
                  max_retries=config.max_retries, startup_timeout_s=config.startup_timeout_s,
                  routed_layout=routed_layout, weight_sync=config.weight_sync)
    if config.engine == "sglang":
        if config.sglang_router:
            return Rollout(SGLangEngine.from_router(config.sglang_router, **kwargs))
        return Rollout(SGLangEngine(list(config.sglang_url), **kwargs))
    if hf_dir is None:
        raise ValueError("start_rollout: the local engine needs hf_dir, the model directory to serve")
    log = Path(log_dir) / "rollout_server.log" if log_dir is not None else None
    servers = start_local_servers(hf_dir, config.num_engines, seed=seed, device=config.local_device,
                                  max_running_requests=config.max_concurrency, log_path=log)
    try:
        return Rollout(SGLangEngine([s.url for s in servers], **kwargs), servers)
    except BaseException:
        for server in servers:
            server.stop()
        raise


def sampling_from_config(config: Any, seed: int | None = None) -> SamplingParams:
    """The rollout's :class:`SamplingParams`; pass a per-step ``seed`` for reproducible rollouts."""
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          max_new_tokens=config.max_response_len, seed=seed)
