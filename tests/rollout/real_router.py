"""The real sglang-router (pinned in requirements/test.txt) as a subprocess on free loopback ports.

    with SGLangRouter([server.url], log_path=tmp / "router.log") as router:
        engine = SGLangEngine.from_router(router.url)

It binds 0.0.0.0 by default (its HTTP port and its Prometheus exporter), so both get
``127.0.0.1``. ``round_robin`` spreads requests over every worker, which the tests rely on to see
traffic reach a worker they just added (the default ``cache_aware`` keeps a prompt on one worker).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from luspo_megatron.runtime.distributed import free_port


class SGLangRouter:
    """One ``python -m sglang_router.launch_router`` process (its title becomes ``sglang::router``)."""

    def __init__(self, worker_urls: list[str] = (), *, log_path: str | Path | None = None,
                 policy: str = "round_robin", extra_args: tuple[str, ...] = ()) -> None:
        self.worker_urls = list(worker_urls)
        self.log_path, self.policy, self.extra_args = log_path, policy, tuple(extra_args)
        self.port, self.prometheus_port = free_port(), free_port()  # known before it starts
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.prometheus_port),
                   "--policy", self.policy, "--log-level", "warn", *self.extra_args]
        return command + (["--worker-urls", *self.worker_urls] if self.worker_urls else [])

    def start(self, timeout_s: float = 60.0, wait: bool = True) -> SGLangRouter:
        """Launch, then (``wait``) wait until ``GET /workers`` lists every initial worker."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1"))
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        if not wait:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited with status {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError, ValueError):
                if len(self.workers()) >= len(self.worker_urls):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sglang-router did not list its workers within {timeout_s:.0f} s; see {self.log_path}")

    def workers(self) -> list[str]:
        """The worker URLs the router lists now (read with the standard library)."""
        with urllib.request.urlopen(f"{self.url}/workers", timeout=5) as resp:
            return [w["url"] for w in json.loads(resp.read())["workers"]]

    def log(self) -> str:
        """The router's log without its colour codes."""
        return re.sub(r"\x1b\[[0-9;]*m", "", Path(self.log_path).read_text()) if self.log_path else ""

    def stop(self) -> None:
        """SIGKILL: the router holds nothing worth a graceful stop (which waits out its grace period)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> SGLangRouter:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
