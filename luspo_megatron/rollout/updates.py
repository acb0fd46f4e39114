"""The client side of SGLang's three weight-update paths, each inside pause → flush → update → continue.

    updater = WeightUpdater(pool, mode="disk", weights_dir="runs/x/rollout_weights", config_dir=hf_dir)
    updater.sync(policy_weights, "7")      # (HF name, tensor) stream → every worker, version "7"

- ``disk``: the stream is written as a HF directory (``weight_sync.write_hf_checkpoint``, published
  by rename) and every worker gets ``/update_weights_from_disk``;
- ``tensor`` (colocated engines): each bucket is serialized (``weight_sync.serialize_named_tensors``)
  and posted to ``/update_weights_from_tensor``, one entry per engine TP rank;
- ``distributed``: the first sync creates the broadcast group (``/init_weights_update_group``), then
  each bucket's names, dtypes and shapes go to ``/update_weights_from_distributed`` while the
  tensors travel by broadcast from this process (rank 0 of the group).

Every update carries the new weight version. Workers are resumed whatever fails.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import weight_sync
from luspo_megatron.rollout.engine import WeightStream
from luspo_megatron.rollout.weight_sync import Bucket, bucket_by_bytes
from luspo_megatron.rollout.workers import WorkerPool, check_all, check_control
from luspo_megatron.runtime.distributed import free_port

WEIGHT_SYNC_MODES = ("disk", "distributed", "tensor")


class WeightUpdater:
    """Pushes new weights to the workers of a :class:`WorkerPool` (module docstring)."""

    def __init__(self, pool: WorkerPool, mode: str = "disk", *, weights_dir: str | Path | None = None,
                 config_dir: str | Path | None = None, bucket_bytes: int = 512 * 1024**2,
                 master: tuple[str | None, int | None] = (None, None),
                 on_published: Callable[[Path, str], None] | None = None) -> None:
        if mode not in WEIGHT_SYNC_MODES:
            raise RolloutError(f"weight_sync: expected one of {WEIGHT_SYNC_MODES}, got {mode!r}")
        self.pool, self.mode, self.bucket_bytes = pool, mode, bucket_bytes
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.master = master
        self.on_published = on_published  # e.g. a supervisor: what a restarted server must load
        self.group: weight_sync.UpdateGroup | None = None

    def sync(self, weights: WeightStream, weight_version: str) -> None:
        """Push ``weights`` the configured way and set ``weight_version`` on every worker."""
        if self.mode == "disk":
            if self.weights_dir is None or self.config_dir is None:
                raise RolloutError("weight_sync disk: the engine needs weights_dir and config_dir")
            buckets = bucket_by_bytes(weights, self.bucket_bytes)
            path = weight_sync.write_hf_checkpoint(buckets, self.weights_dir, self.config_dir)
            self.from_disk(path, weight_version)
            if self.on_published is not None:
                self.on_published(path, weight_version)
        elif self.mode == "tensor":
            self.from_tensor(bucket_by_bytes(weights, self.bucket_bytes), weight_version)
        else:
            if self.group is None:
                host, port = self.master
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                self.init_group(host or _this_host(), port or free_port(), backend=backend)
            self.from_distributed(bucket_by_bytes(weights, self.bucket_bytes), weight_version)

    # --------------------------------------------------------------------------------- the paths
    def from_disk(self, path: str | os.PathLike, weight_version: str) -> None:
        """Point every worker at a complete HF directory (written by ``weight_sync.write_hf_checkpoint``)."""
        body = {"model_path": str(Path(path).resolve()), "weight_version": str(weight_version)}
        self.pool.call(self.pool.paused(lambda: self.pool.post_all("/update_weights_from_disk", body)))

    def from_tensor(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """Colocated engines: each bucket pickled (CUDA-IPC handles for CUDA tensors), one entry per
        engine TP rank."""
        pool = self.pool

        async def update() -> None:
            tp = {u: int((await pool.server_info(u)).get("tp_size", 1)) for u in pool.worker_urls}
            for bucket in buckets:
                entry = weight_sync.serialize_named_tensors(bucket)
                results = await asyncio.gather(*(
                    pool.post(u, "/update_weights_from_tensor", {
                        "serialized_named_tensors": [entry] * tp[u], "flush_cache": False,
                        "weight_version": str(weight_version)})
                    for u in pool.worker_urls))
                for url, (status, answer) in zip(pool.worker_urls, results):
                    check_control(url, "/update_weights_from_tensor", status, answer)
        pool.call(pool.paused(update))

    def init_group(self, master_address: str, master_port: int, *, group_name: str = "luspo-weights",
                   backend: str = "nccl", timeout_s: float = 600.0) -> None:
        """Create the broadcast group: this process is rank 0, engine GPU r of worker w joins as
        ``rank_offset_w + r`` (``rank_offset`` = 1 + GPUs of the workers before it)."""
        pool = self.pool

        async def init() -> None:
            infos = [await pool.server_info(u) for u in pool.worker_urls]
            sizes = [int(i.get("tp_size", 1)) * int(i.get("pp_size", 1)) * int(i.get("dp_size", 1)) for i in infos]
            world = 1 + sum(sizes)
            offsets = list(itertools.accumulate([1] + sizes[:-1]))
            # SGLang's call blocks until we join too: send the requests, then join, then read them.
            posts = [asyncio.ensure_future(pool.post(u, "/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": off,
                "world_size": world, "group_name": group_name, "backend": backend}, timeout_s))
                for u, off in zip(pool.worker_urls, offsets)]
            try:
                self.group = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: weight_sync.UpdateGroup(master_address, master_port, 0, world, group_name, backend,
                                                          timeout_s))
            finally:
                results = await asyncio.gather(*posts, return_exceptions=True)
            check_all(pool.worker_urls, "/init_weights_update_group", results)
        pool.call(init())

    def from_distributed(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """Per bucket: post names/dtypes/shapes to every worker, then broadcast the tensors from
        rank 0 in that order (bucket bytes bound the memory both sides hold at once)."""
        group, pool = self.group, self.pool
        if group is None:
            raise RolloutError("update_weights_from_distributed: call init_weights_update_group first")
        device = "cpu" if isinstance(group.backend, torch.distributed.ProcessGroupGloo) else "cuda"

        async def update() -> None:
            loop = asyncio.get_running_loop()
            for bucket in buckets:
                tensors = [t.detach().to(device).contiguous() for _, t in bucket]
                meta = {"names": [n for n, _ in bucket], "dtypes": [weight_sync.dtype_name(t.dtype) for t in tensors],
                        "shapes": [list(t.shape) for t in tensors], "group_name": group.name,
                        "flush_cache": False, "weight_version": str(weight_version)}
                posts = [asyncio.ensure_future(pool.post(u, "/update_weights_from_distributed", meta))
                         for u in pool.worker_urls]
                try:
                    await loop.run_in_executor(None, group.broadcast, tensors)
                finally:
                    results = await asyncio.gather(*posts, return_exceptions=True)
                check_all(pool.worker_urls, "/update_weights_from_distributed", results)
        pool.call(pool.paused(update))

    def destroy_group(self) -> None:
        if self.group is None:
            return
        self.pool.call(self.pool.post_all("/destroy_weights_update_group", {"group_name": self.group.name}))
        self.group.close()
        self.group = None


def _this_host() -> str:
    """An address of this host the engines can reach (its name's address; loopback alone as a last resort)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
