"""Start and stop our SGLang-API server (:mod:`luspo_megatron.rollout.local.server`) as subprocesses.

    with LocalServer(hf_dir) as server:            # a free port on 127.0.0.1
        engine = SGLangEngine([server.url])

The trainer's embedded default (``--rollout-engine local``) uses :func:`start_local_servers`; the
tests start one per module. The server's output goes to ``log_path`` (or is discarded).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.local.faults import FaultConfig
from luspo_megatron.runtime.distributed import free_port

_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.kill()


class LocalServer:
    """One ``python -m luspo_megatron.rollout.local.server`` subprocess."""

    def __init__(
        self, hf_dir: str | Path, *, host: str = "127.0.0.1", port: int | None = None, device: str = "cpu",
        dtype: str = "float32", max_running_requests: int = 64, seed: int = 0, faults: FaultConfig | None = None,
        weight_version: str = "default", log_path: str | Path | None = None, threads: int = 1,
    ) -> None:
        self.hf_dir, self.host, self.device, self.dtype = str(hf_dir), host, device, dtype
        self.port = port
        self.max_running_requests, self.seed, self.faults = max_running_requests, seed, faults or FaultConfig()
        self.weight_version, self.log_path, self.threads = weight_version, log_path, threads
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        f = self.faults
        return [
            sys.executable, "-m", "luspo_megatron.rollout.local.server", "--hf-dir", self.hf_dir, "--host", self.host,
            "--port", str(self.port), "--device", self.device, "--dtype", self.dtype,
            "--max-running-requests", str(self.max_running_requests), "--seed", str(self.seed),
            "--weight-version", self.weight_version,
            "--fault-health-503-first", str(f.health_503_first), "--fault-500-every", str(f.error_500_every),
            "--fault-drop-every", str(f.drop_every), "--fault-abort-every", str(f.abort_every),
            "--fault-slow-s", str(f.slow_s),
        ]

    def start(self, timeout_s: float = 120.0) -> LocalServer:
        """Launch and wait until ``/model_info`` answers (health checks are the client's job)."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the subprocess without waiting for it."""
        self.port = self.port or free_port(self.host)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        _LIVE.add(self.proc)

    def wait_ready(self, timeout_s: float = 120.0) -> LocalServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RolloutError(f"local server on port {self.port} exited with status {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/model_info", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise RolloutError(f"local server on port {self.port} did not answer within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _LIVE.discard(self.proc)
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_servers(hf_dir: str | Path, count: int, *, seed: int = 0, **kwargs) -> list[LocalServer]:
    """Start ``count`` servers on free ports (seeds ``seed``, ``seed + 1``, …) and wait for all."""
    servers = [LocalServer(hf_dir, seed=seed + i, **kwargs) for i in range(count)]
    try:
        for server in servers:  # launch all, then wait: their start-up overlaps
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
