"""The rollout section: where samples come from, how they are drawn, how weights reach the engines."""

from __future__ import annotations

from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive
from luspo_megatron.errors import ConfigError


# ------------------------------------------------------------------------------------------- rollout
@dataclass(frozen=True)
class RolloutConfig:
    """Where rollouts come from and how they are sampled (flags follow slime)."""

    engine: str = opt(
        "local", "--rollout-engine",
        help="local: start our SGLang-API server; sglang: external SGLang servers; inprocess: generate in the "
             "trainer's process (rank 0) with the same engine, no HTTP (CPU and toy models).",
        choices=("local", "sglang", "inprocess"),
    )
    sglang_url: tuple[str, ...] = opt((), "--sglang-url", help="SGLang server URLs (load-balanced).", nargs="+")
    sglang_router: str | None = opt(None, "--sglang-router", help="sglang-router URL (instead of --sglang-url).")
    sglang_api_key: str | None = opt(
        None, "--sglang-api-key", help="API key of the SGLang servers / router (sent as Authorization: Bearer)."
    )
    num_engines: int = opt(1, "--rollout-num-engines", help="Local rollout servers to start.")
    rollout_batch_size: int = opt(8, "--rollout-batch-size", help="Prompts per rollout step (P).")
    max_response_len: int = opt(64, "--rollout-max-response-len", help="max_new_tokens of every response.")
    temperature: float = opt(1.0, "--rollout-temperature", help="Sampling temperature.")
    top_p: float = opt(1.0, "--rollout-top-p", help="Nucleus sampling threshold, in (0, 1].")
    top_k: int = opt(-1, "--rollout-top-k", help="Top-k sampling; -1 disables it.")
    max_concurrency: int = opt(64, "--rollout-max-concurrency", help="Requests in flight per server.")
    request_timeout_s: float = opt(600.0, "--rollout-request-timeout", help="Per-request timeout, seconds.")
    max_retries: int = opt(5, "--rollout-max-retries", help="Retries of a failed or aborted request.")
    weight_sync: str = opt(
        "disk", "--weight-sync", help="How new weights reach the engines.", choices=("disk", "distributed", "tensor")
    )
    update_weight_buffer_size: int = opt(
        512 * 1024**2, "--update-weight-buffer-size", help="Bucket size in bytes for weight sync."
    )
    use_rollout_logprobs: bool = opt(
        False, "--use-rollout-logprobs", help="Use the engine's log-probs as old_logp (skip the recompute).",
        action="store_true",
    )
    use_rollout_routing_replay: bool = opt(
        False, "--use-rollout-routing-replay", help="Replay the engine's MoE routing in training (R3).",
        action="store_true",
    )
    startup_timeout_s: float = opt(
        600.0, "--rollout-startup-timeout", help="Seconds to wait for every server's /health_generate at start."
    )
    local_device: str = opt("cpu", "--rollout-device", help="Device of the local rollout server: cpu or cuda[:N].")
    # ---- asynchronous rollout (issue 17; trainer/async_rollout.py, docs/async.md) ----
    async_rollout: bool = opt(
        False, "--async-rollout", action="store_true",
        help="Generate and score step n+1's samples while step n trains (one step off-policy; engines with "
             "their own process only: local, sglang).",
    )
    async_correction: str = opt(
        "bypass", "--async-correction", choices=("bypass", "recompute"),
        help="With --async-rollout, the PPO anchor of the stale samples: bypass = the rollout log-probs "
             "(as --use-rollout-logprobs, no extra forward); recompute = recomputed old log-probs, corrected "
             "toward the rollout policy by --use-tis / --tis-level / --tis-mode.",
    )
    # Shared with issue 13's per-sample check (helper `fleet` adds the same field; the lead keeps one).
    max_weight_staleness: int | None = opt(
        None, "--max-weight-staleness",
        help="Most policy versions a training sample may lag behind the policy it trains; None: 0, or 1 with "
             "--async-rollout.",
    )

    def __post_init__(self) -> None:
        positive(RolloutConfig, self, "num_engines", "rollout_batch_size", "max_response_len", "max_concurrency")
        if self.sglang_api_key is not None:
            check(bool(self.sglang_api_key.strip()), RolloutConfig, "sglang_api_key", "a non-empty key",
                  self.sglang_api_key)
        check(self.startup_timeout_s > 0, RolloutConfig, "startup_timeout_s", "> 0", self.startup_timeout_s)
        check(self.local_device == "cpu" or self.local_device.startswith("cuda"), RolloutConfig, "local_device",
               "cpu or cuda[:N]", self.local_device)
        check(self.max_retries >= 0, RolloutConfig, "max_retries", "≥ 0", self.max_retries)
        check(self.temperature > 0, RolloutConfig, "temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, RolloutConfig, "top_p", "a float in (0, 1]", self.top_p)
        check(self.top_k == -1 or self.top_k >= 1, RolloutConfig, "top_k", "-1 or ≥ 1", self.top_k)
        check(self.request_timeout_s > 0, RolloutConfig, "request_timeout_s", "> 0", self.request_timeout_s)
        positive(RolloutConfig, self, "update_weight_buffer_size")
        if self.engine == "sglang":
            check(
                bool(self.sglang_url) != bool(self.sglang_router), RolloutConfig, "sglang_url",
                "exactly one of --sglang-url or --sglang-router with --rollout-engine sglang",
                self.sglang_url or self.sglang_router,
            )
        if self.engine == "local":
            check(self.weight_sync == "disk", RolloutConfig, "weight_sync", "disk for the local engine",
                   self.weight_sync)
        if self.engine == "inprocess":
            check(self.weight_sync in ("disk", "tensor"), RolloutConfig, "weight_sync",
                   "disk or tensor for the inprocess engine", self.weight_sync)
        # ---- asynchronous rollout ----
        check(self.async_correction in ("bypass", "recompute"), RolloutConfig, "async_correction",
              "bypass or recompute", self.async_correction)
        if self.max_weight_staleness is not None:
            check(isinstance(self.max_weight_staleness, int) and self.max_weight_staleness >= (1 if self.async_rollout
                  else 0), RolloutConfig, "max_weight_staleness", "≥ 1 with --async-rollout (≥ 0 without)",
                  self.max_weight_staleness)
        if self.async_rollout and self.engine == "inprocess":
            raise ConfigError("--async-rollout: expected a rollout engine in its own process (--rollout-engine local "
                              "or sglang), got inprocess (it shares the trainer's interpreter)", field="async_rollout")
        if self.async_rollout and self.async_correction == "recompute":
            check(not self.use_rollout_logprobs, RolloutConfig, "async_correction",
                  "bypass (not recompute) together with --use-rollout-logprobs", self.async_correction)
