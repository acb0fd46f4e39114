"""Fault injection for our SGLang-API server, so tests can make it fail the ways real servers do.

Test-only: the server honours none of this unless it was started with ``--enable-fault-injection``.
Without that flag the ``/luspo/faults`` routes do not exist (404) and the ``--fault-*`` flags are
refused, so nobody who can reach a production server can make it fail or exit.

Counts are over ``/generate`` requests in arrival order, 1-based: with ``error_500_every=3`` the
3rd, 6th, 9th … requests get HTTP 500. Set at start-up (``tools/serve_local.py
--enable-fault-injection --fault-*``) or at run time with ``POST /luspo/faults`` (the body is this
dataclass as JSON, and the counters restart).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FaultConfig:
    health_503_first: int = 0  # the first k /health and /health_generate calls answer 503
    error_500_every: int = 0  # every m-th /generate answers HTTP 500
    drop_every: int = 0  # every m-th /generate has its connection closed without an answer
    abort_every: int = 0  # every m-th /generate returns HTTP 200 with finish_reason abort
    slow_s: float = 0.0  # every /generate waits this long before it is queued
    exit_after: int = 0  # the server process dies (exit status 3) on the k-th /generate: a crash mid-rollout
    stall_s: float = 0.0  # every batch blocks the model thread this long before generating: a wedged engine
    poison_rid: str = ""  # a batch holding a row of this request raises inside generation (isolation tests)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "str":
                if not isinstance(value, str):
                    raise ValueError(f"{f.name}: expected a string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{f.name}: expected a finite number ≥ 0, got {value!r}")

    @classmethod
    def from_json(cls, body: Any) -> FaultConfig:
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object of {[f.name for f in dataclasses.fields(cls)]}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(body) - names
        if unknown:
            raise ValueError(f"unknown fault keys {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**body)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FaultInjector:
    """Decides, request by request, which fault (if any) to inject."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        self.config = config
        self.health_calls = 0
        self.generate_calls = 0

    def health(self) -> bool:
        """True when this health check must answer 503."""
        self.health_calls += 1
        return self.health_calls <= self.config.health_503_first

    def generate(self) -> str | None:
        """"exit", "error_500", "drop", "abort" or None for the next /generate request."""
        self.generate_calls += 1
        n, c = self.generate_calls, self.config
        if c.exit_after and n == c.exit_after:
            return "exit"
        for kind, every in (("error_500", c.error_500_every), ("drop", c.drop_every), ("abort", c.abort_every)):
            if every and n % every == 0:
                return kind
        return None
