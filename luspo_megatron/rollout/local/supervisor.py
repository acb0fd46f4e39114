"""Local rollout servers that stay up: a server that dies is restarted, with the newest weights.

The trainer's ``--rollout-engine local`` runs our SGLang-API servers (``rollout.server``) as
subprocesses. A watchdog thread polls them; when one exits, it is relaunched on the same port with
the weights the trainer last synced, and the weight version to match. Requests that were in flight
fail with a connection error, which the SGLang client retries with backoff, so a step's finished
samples are kept and its lost ones regenerated (docs/design.md §4, step 2: never drop a sample).

The servers are guarded as any shared service (docs/reliability.md §1): they require
:attr:`LocalEngines.api_key` (random per run unless ``$LUSPO_ROLLOUT_API_KEY`` is set; give it to
the client: ``SGLangEngine(engines.urls, api_key=engines.api_key)``), and, when the trainer passes
``allowed_weight_dirs`` (the directories it writes weights to), read weights from nowhere else.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from luspo_megatron.rollout.local.process import LocalServer, local_api_key, start_local_servers

logger = logging.getLogger("luspo_megatron.rollout")


class LocalEngines:
    """``count`` local servers for ``hf_dir`` and their watchdog. Use as a context manager."""

    def __init__(self, hf_dir: str | Path, count: int, *, seed: int = 0, device: str = "cpu",
                 log_dir: str | Path | None = None, startup_timeout_s: float = 120.0, poll_s: float = 0.25,
                 threads: int | None = None, api_key: str | None = None,
                 allowed_weight_dirs: list[str | Path] | None = None) -> None:
        self.count, self.seed, self.device, self.poll_s = count, seed, device, poll_s
        self.api_key = api_key or local_api_key()  # the servers require it; the client must send it
        self.allowed_weight_dirs = allowed_weight_dirs
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = Path(log_dir) if log_dir is not None else None
        # The trainer waits while the servers generate, so they may use the machine's cores, unless
        # OMP_NUM_THREADS says otherwise: more OpenMP threads than free cores (a shared machine) spin
        # against each other, and generation then runs ~40x slower (docs/bench/vs_trl.md).
        omp = os.environ.get("OMP_NUM_THREADS", "")
        default = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, min(4, os.cpu_count() or 1))
        self.threads = threads or default
        self._weights = (str(hf_dir), "default")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.servers: list[LocalServer] = []
        self.restarts = 0
        self.engine = None  # the client, for callers that want both in one place

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def set_weights(self, hf_dir: str | Path, version: str) -> None:
        """What a restarted server must load: the weights of the latest sync."""
        with self._lock:
            self._weights = (str(hf_dir), version)

    def _log_path(self, index: int) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"server_{index}.log"

    def __enter__(self) -> LocalEngines:
        hf_dir, version = self._weights
        self.servers = start_local_servers(
            hf_dir, self.count, seed=self.seed, device=self.device, weight_version=version,
            threads=self.threads, log_path=self._log_path(0) if self.count == 1 else None,
            api_key=self.api_key, allowed_weight_dirs=self.allowed_weight_dirs,
        )
        self._thread = threading.Thread(target=self._watch, name="rollout-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for server in self.servers:
            server.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for index, server in enumerate(self.servers):
                proc = server.proc
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                logger.warning("local rollout server %s exited with status %s: restarting it", server.url,
                               proc.returncode)
                self._restart(index, server)

    def _restart(self, index: int, dead: LocalServer, attempts: int = 3) -> None:
        dead.stop()
        for attempt in range(1, attempts + 1):
            with self._lock:
                hf_dir, version = self._weights
            replacement = LocalServer(hf_dir, port=dead.port, seed=dead.seed, device=self.device,
                                      weight_version=version, threads=self.threads, log_path=self._log_path(index),
                                      api_key=self.api_key, allowed_weight_dirs=self.allowed_weight_dirs)
            try:
                replacement.start(timeout_s=self.startup_timeout_s)
            except Exception as err:  # a port still in TIME_WAIT, a slow start: try again
                logger.error("restarting the rollout server on port %s failed (attempt %d/%d): %s", dead.port,
                             attempt, attempts, err)
                continue
            self.servers[index] = replacement
            self.restarts += 1
            return
        logger.error("the rollout server on port %s could not be restarted; the client will report it", dead.port)
