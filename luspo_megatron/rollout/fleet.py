"""From a :class:`~luspo_megatron.config.RolloutConfig` to a ready engine: the trainer's one call.

    with start_fleet(cfg.rollout, hf_dir=assets.hf_dir, seed=cfg.seed, log_dir=log_dir) as engine:
        groups = engine.generate(prompt_ids, sampling, n=G)
        engine.sync_weights(policy.hf_weights(), "7")

- ``--rollout-engine local`` (the embedded default): ``--rollout-num-engines`` of our servers on free
  ports, watched by a supervisor that restarts a dead one with the newest weights, behind the
  SGLang client;
- ``sglang``: the ``--sglang-url`` servers, or the workers of one ``--sglang-router`` (re-read before
  every rollout and sync; ``rollout/sglang.py``, ``rollout/membership.py``);
- ``inprocess``: our generator in the trainer's process (toy models; no HTTP).

Every engine is healthy when the block starts, and closed (servers stopped) when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from luspo_megatron.config import RolloutConfig
from luspo_megatron.rollout.engine import RolloutEngine
from luspo_megatron.rollout.sglang import SGLangEngine

ROLLOUT_WEIGHTS = "rollout_weights"  # under log_dir: where disk syncs publish the policy
SERVER_LOGS = "rollout_servers"  # under log_dir: the local servers' logs


@contextlib.contextmanager
def start_fleet(config: RolloutConfig, *, hf_dir: str | Path, seed: int = 0, log_dir: str | Path = ".",
                routed_layout: tuple[int, int] | None = None) -> Iterator[RolloutEngine]:
    """Start (local, inprocess) or attach to (sglang) the engines ``config`` describes, serving
    ``hf_dir`` first; ``routed_layout=(num_layers, top_k)`` turns on routing replay (R3)."""
    log_dir = Path(log_dir)
    weights_dir = log_dir / ROLLOUT_WEIGHTS
    if config.engine == "inprocess":
        from luspo_megatron.rollout.local.inprocess import InProcessEngine

        with InProcessEngine(hf_dir, device=config.local_device, seed=seed, dtype=config.local_dtype,
                             return_routed_experts=routed_layout is not None, weight_sync=config.weight_sync,
                             weights_dir=weights_dir, bucket_bytes=config.update_weight_buffer_size) as engine:
            yield engine
        return
    options: dict[str, Any] = dict(
        max_concurrency=config.max_concurrency, request_timeout_s=config.request_timeout_s,
        max_retries=config.max_retries, routed_layout=routed_layout, weight_sync=config.weight_sync,
        weights_dir=weights_dir, config_dir=hf_dir, bucket_bytes=config.update_weight_buffer_size,
        update_master=(config.update_weight_master_addr, config.update_weight_master_port),  # sync helper, issue 13
    )
    if config.engine == "sglang":
        options["api_key"] = config.sglang_api_key
        # The constructor's wait (not its 600 s default), also for the router's first workers.
        options["startup_timeout_s"] = config.startup_timeout_s
        engine = (SGLangEngine.from_router(config.sglang_router, **options) if config.sglang_router
                  else SGLangEngine(list(config.sglang_url), **options))
        with engine:
            engine.wait_healthy(config.startup_timeout_s)
            yield engine
        return
    from luspo_megatron.rollout.local.supervisor import LocalEngines

    # The local servers serve the weights of the policy as it is now (a resumed run exported them).
    # They take a random API key and read weights only where disk syncs publish them.
    with LocalEngines(hf_dir, config.num_engines, seed=seed, device=config.local_device,
                      log_dir=log_dir / SERVER_LOGS, startup_timeout_s=config.startup_timeout_s,
                      allowed_weight_dirs=[weights_dir]) as local:
        with SGLangEngine(local.urls, on_weights_published=local.set_weights, api_key=local.api_key,
                          **options) as engine:
            engine.wait_healthy(config.startup_timeout_s)
            engine.counters["rollout_engine_restarts"] = lambda: local.restarts
            engine.supervisor = local
            local.engine = engine
            yield engine
