"""What every trainer rank needs to know about one weight sync, and what it reports back.

Small, picklable records: the coordinator (``rollout/updates.py``, rank 0) makes a
:class:`SyncPlan`, the trainer broadcasts it, each rank's ``rollout/push.py::ShardPusher`` follows
it and returns a :class:`ShardReport`. :func:`engine_ranks` counts an engine's ranks in an update
group as SGLang does.
"""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from luspo_megatron.errors import RolloutError


@dataclass(frozen=True)
class GroupPlan:
    """How the owning ranks build their update groups (``distributed``). ``generation`` changes
    when the groups must be made again; ``lock`` is the (host, port) of the coordinator's store."""

    generation: int
    world_size: int
    rank_offsets: tuple[int, ...]
    backend: str
    master_addr: str | None
    master_port: int | None
    lock: tuple[str, int]
    timeout_s: float
    prefix: str = "luspo-weights"


@dataclass(frozen=True)
class SyncPlan:
    """One sync, as every trainer rank needs it (small: it travels by ``broadcast_object``)."""

    mode: str
    version: str
    sync_id: int
    urls: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()
    bucket_bytes: int = 512 * 1024**2
    stage_dir: str | None = None
    tp_sizes: tuple[int, ...] = ()
    groups: GroupPlan | None = None


@dataclass
class ShardReport:
    """What one trainer rank did in a sync. ``weight_map`` (disk): HF name -> shard file."""

    rank: int
    tensors: int = 0
    bytes: int = 0
    weight_map: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def engine_ranks(url: str, info: dict[str, Any]) -> int:
    """The ranks an engine takes in an update group: its GPUs, tp·pp·dp (dp inside tp with DP
    attention). SGLang 0.5.23 joins every model runner at ``rank_offset + tp_rank``
    (``ModelRunner.init_weights_update_group``), so its ranks are distinct only when the GPUs are
    the tp ranks of one pipeline stage and one replica; other layouts would make two GPUs claim one
    rank and hang, so they are refused here."""
    tp, pp, dp = (int(info.get(k, 1) or 1) for k in ("tp_size", "pp_size", "dp_size"))
    gpus = tp * pp * (1 if info.get("enable_dp_attention") else dp)  # SGLang launches this many schedulers
    if gpus != tp:
        raise RolloutError(
            f"{url}: --weight-sync distributed: this engine runs tp {tp}, pp {pp}, dp {dp} on {gpus} GPUs, but "
            "SGLang joins an update group at rank_offset + tp_rank, so its pipeline stages or data-parallel "
            "replicas would take the same ranks; use --weight-sync disk for it (or DP attention)")
    return gpus


def this_host(toward: str | None = None) -> str:
    """An address of this host that the engines can reach: the local address of the route toward
    ``toward`` (an engine URL; a UDP "connect" sends nothing, the kernel only picks the route), else
    the address this host's name resolves to, else loopback."""
    if toward:
        host = urllib.parse.urlsplit(toward).hostname
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))
                return probe.getsockname()[0]
        except (OSError, TypeError):
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
