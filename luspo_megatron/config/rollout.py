"""The rollout section: where samples come from, how they are drawn, how weights reach the engines."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive, seconds, validate_fields
from luspo_megatron.errors import ConfigError

DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
TOP_K_MAX = 2**30  # what our server (and sglang's int32 sampling kernels) accept


def is_http_url(url: str) -> bool:
    """``http(s)://host[:port][/path]``: what the SGLang client can append ``/generate`` to."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in [0, 65535])
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment


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
    # Weight sync at scale (issue 13): where the engines reach the trainer's update groups.
    update_weight_master_addr: str | None = opt(
        None, "--update-weight-master-addr",
        help="--weight-sync distributed: the address the engines join the trainer's update groups at (each "
             "owning rank hosts its own group); default: each owning rank's own address on its route to the "
             "engines.",
    )
    update_weight_master_port: int | None = opt(
        None, "--update-weight-master-port",
        help="--weight-sync distributed: trainer rank r's update group listens on this port + r; default: a free "
             "port per group.",
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
    local_dtype: str = opt(
        "float32", "--rollout-dtype", choices=("float32", "bfloat16", "float16"),
        help="Weight dtype of the engine we run in-process (--rollout-engine inprocess), e.g. bfloat16 against an "
             "fp32 trainer to see train–inference mismatch. SGLang servers take their own --dtype.",
    )
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
    # How old a sample's weights may be (rollout/versions.py checks every sample): see weight_staleness_bound.
    max_weight_staleness: int | None = opt(
        None, "--max-weight-staleness",
        help="Accept samples drawn by weights up to N versions older than the last push (counted as stale_samples "
             "in metrics.jsonl); an older, newer or unknown weight_version stops the run. Default 0 (every sample "
             "from the weights pushed last), or 1 with --async-rollout.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(RolloutConfig, self, "num_engines", "rollout_batch_size", "max_response_len", "max_concurrency")
        if self.sglang_api_key is not None:
            check(bool(self.sglang_api_key.strip()), RolloutConfig, "sglang_api_key", "a non-empty key",
                  self.sglang_api_key)
        seconds(RolloutConfig, self, "startup_timeout_s", "request_timeout_s")
        check(DEVICE.fullmatch(self.local_device) is not None, RolloutConfig, "local_device", "cpu or cuda[:N]",
              self.local_device)
        for url in self.sglang_url:
            check(is_http_url(url), RolloutConfig, "sglang_url", "http(s)://host[:port] URLs", url)
        if self.sglang_router is not None:
            check(is_http_url(self.sglang_router), RolloutConfig, "sglang_router", "an http(s)://host[:port] URL",
                  self.sglang_router)
        check(self.local_dtype == "float32" or self.engine == "inprocess", RolloutConfig, "local_dtype",
              "float32 unless --rollout-engine inprocess (the local servers start in float32)", self.local_dtype)
        check(self.max_retries >= 0, RolloutConfig, "max_retries", "≥ 0", self.max_retries)
        check(self.temperature > 0, RolloutConfig, "temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, RolloutConfig, "top_p", "a float in (0, 1]", self.top_p)
        check(self.top_k == -1 or 1 <= self.top_k <= TOP_K_MAX, RolloutConfig, "top_k", "-1 or in [1, 2**30]",
              self.top_k)
        positive(RolloutConfig, self, "update_weight_buffer_size")
        check(self.update_weight_master_addr is None or bool(str(self.update_weight_master_addr).strip()),
              RolloutConfig, "update_weight_master_addr", "a host name or address", self.update_weight_master_addr)
        check(self.update_weight_master_port is None or (isinstance(self.update_weight_master_port, int)
                                                         and 1 <= self.update_weight_master_port <= 65535),
              RolloutConfig, "update_weight_master_port", "a port in [1, 65535]", self.update_weight_master_port)
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

    @property
    def weight_staleness_bound(self) -> int:
        """``--max-weight-staleness``: 0 by default, 1 with ``--async-rollout`` (its samples are drawn by the
        weights one version behind the policy they train)."""
        if self.max_weight_staleness is not None:
            return self.max_weight_staleness
        return 1 if self.async_rollout else 0
