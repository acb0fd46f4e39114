"""Start and stop our SGLang-API server (:mod:`luspo_megatron.rollout.local.server`) as subprocesses.

    with LocalServer(hf_dir) as server:            # a free port on 127.0.0.1
        engine = SGLangEngine([server.url])

The trainer's embedded default (``--rollout-engine local``) uses :func:`start_local_servers`; the
tests start one per module. The server's output goes to ``log_path`` (or is discarded).

Hooks for the trainer (``supervisor.LocalEngines`` uses them):

- ``api_key``: the server requires it (``Authorization: Bearer``); it reaches the subprocess through
  ``$LUSPO_ROLLOUT_API_KEY``, never its command line (which every user of the machine can read).
  :func:`local_api_key` gives a run its key: ``$LUSPO_ROLLOUT_API_KEY`` if set, else a random one.
- ``allowed_weight_dirs``: the only directories ``/update_weights_from_disk`` may read.
- ``enable_fault_injection`` (tests only): defaults to ``$LUSPO_ROLLOUT_ENABLE_FAULT_INJECTION=1``,
  so a test can make the servers a trainer starts injectable; ``faults`` need it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.local.auth import API_KEY_ENV
from luspo_megatron.rollout.local.faults import FaultConfig
from luspo_megatron.runtime.distributed import free_port

_LIVE: set[subprocess.Popen] = set()
FAULT_INJECTION_ENV = "LUSPO_ROLLOUT_ENABLE_FAULT_INJECTION"  # "1": local servers accept faults (tests only)


def local_api_key() -> str:
    """The key for a run's local servers: ``$LUSPO_ROLLOUT_API_KEY`` when set (to reach them by hand),
    else a fresh random one."""
    return os.environ.get(API_KEY_ENV) or secrets.token_urlsafe(32)


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
        api_key: str | None = None, allowed_weight_dirs: list[str | Path] | None = None,
        enable_fault_injection: bool | None = None, extra_args: tuple[str, ...] = (),
    ) -> None:
        self.hf_dir, self.host, self.device, self.dtype = str(hf_dir), host, device, dtype
        self.port = port
        self.max_running_requests, self.seed, self.faults = max_running_requests, seed, faults or FaultConfig()
        self.weight_version, self.log_path, self.threads = weight_version, log_path, threads
        self.api_key = api_key
        self.allowed_weight_dirs = [str(Path(d).resolve()) for d in allowed_weight_dirs or ()] or None
        if enable_fault_injection is None:
            enable_fault_injection = os.environ.get(FAULT_INJECTION_ENV) == "1"
        if self.faults != FaultConfig() and not enable_fault_injection:
            raise ValueError("faults: the server injects faults only with enable_fault_injection=True (tests)")
        self.enable_fault_injection = enable_fault_injection
        self.extra_args = tuple(extra_args)  # more server flags, e.g. ("--health-timeout-s", "2")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (the API key is not on it: see :meth:`launch`)."""
        command = [
            sys.executable, "-m", "luspo_megatron.rollout.local.server", "--hf-dir", self.hf_dir, "--host", self.host,
            "--port", str(self.port), "--device", self.device, "--dtype", self.dtype,
            "--max-running-requests", str(self.max_running_requests), "--seed", str(self.seed),
            "--weight-version", self.weight_version,
        ]
        if self.allowed_weight_dirs:
            command += ["--allowed-weight-dirs", *self.allowed_weight_dirs]
        if self.enable_fault_injection:
            f = self.faults
            command += [
                "--enable-fault-injection",
                "--fault-health-503-first", str(f.health_503_first), "--fault-500-every", str(f.error_500_every),
                "--fault-drop-every", str(f.drop_every), "--fault-abort-every", str(f.abort_every),
                "--fault-slow-s", str(f.slow_s), "--fault-stall-s", str(f.stall_s),
            ]
        return command + list(self.extra_args)

    def start(self, timeout_s: float = 120.0) -> LocalServer:
        """Launch and wait until ``/model_info`` answers (health checks are the client's job)."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the subprocess without waiting for it."""
        self.port = self.port or free_port(self.host)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        env.pop(API_KEY_ENV, None)  # the server's key is ours to give, not inherited
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
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
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{self.url}/model_info", headers=headers),
                                            timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    self.stop()
                    raise RolloutError(f"local server on port {self.port} refused our API key (HTTP 401)") from None
                time.sleep(0.05)
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
