"""The transport halves of SGLang's three weight-update paths, shared by the client and our server.

The trainer hands this layer a stream of (HF name, tensor) (``parallel/export.py``) cut into
:func:`bucket_by_bytes` buckets.

(a) disk: every writer (one per owning trainer rank) puts its own safetensors shards
    (:func:`write_shards`) into one directory from :func:`stage_dir`, next to the final name; once
    all have finished, :func:`publish_shards` writes ``model.safetensors.index.json`` and renames the
    directory into place, so ``/update_weights_from_disk`` never sees a half-written one.
    :func:`write_hf_checkpoint` is the same with a single writer.
(b) distributed: an :class:`UpdateGroup` is the process group that
    ``/init_weights_update_group`` creates inside SGLang (trainer = rank 0, engine ranks from
    ``rank_offset``), with the same store keys as ``torch.distributed.init_process_group(
    init_method="tcp://…", group_name=…)``, without touching the trainer's default group; the
    tensors of each bucket then travel by ``broadcast`` from rank 0 in the order of ``names``.
    Several trainer ranks each own such a group with the same engines; a :class:`TicketLock` lets
    one of them at a time talk to the engines, which receive one broadcast at a time.
(c) tensor: :func:`serialize_named_tensors` is the ``serialized_named_tensors`` entry: base64 of a
    pickle of ``[(name, tensor), ...]`` (SGLang's default ``load_format``). CUDA tensors go through
    torch's ForkingPickler (CUDA IPC handles, what colocated SGLang expects); CPU tensors are pickled
    by value. :func:`deserialize_named_tensors` (our server) accepts only tensors.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from luspo_megatron.runtime.durable import fsync_path, replace_dir

Bucket = list[tuple[str, torch.Tensor]]


def bucket_by_bytes(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[Bucket]:
    """Group a stream of (HF name, tensor) into lists of at most ``max_bytes``
    (``--update-weight-buffer-size``); a tensor larger than that travels alone. Order is kept."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes: expected ≥ 1, got {max_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# --------------------------------------------------------------------------------------------- disk
HF_CONFIG_FILES = ("config.json", "generation_config.json")
INDEX_FILE = "model.safetensors.index.json"


def stage_dir(out_dir: str | Path) -> Path:
    """A new empty temporary directory next to ``out_dir`` for the writers of one publication;
    directories left by earlier writers that crashed (``.tmp-{name}-*``) are removed first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".tmp-{out_dir.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_shards(buckets: Iterable[Bucket], directory: str | Path, prefix: str = "model") -> dict[str, str]:
    """Write one safetensors file per bucket (``{prefix}-{k:05d}.safetensors``, fsync-ed) into
    ``directory``; returns HF name -> file name. Several writers (one per owning rank) share a
    directory with distinct prefixes. The tensors are written where they lie: safetensors 0.8
    writes from their memory and accepts disjoint views of one storage (gate/up of a fused fc1)."""
    directory = Path(directory)
    weight_map: dict[str, str] = {}
    index = 0
    for bucket in buckets:  # not enumerate(): its cached result tuple would keep this bucket alive
        index += 1          # while the next one is built
        if not bucket:
            continue
        shard = f"{prefix}-{index:05d}.safetensors"
        tensors = {}
        for name, t in bucket:
            if name in tensors or name in weight_map:
                raise ValueError(f"tensor {name!r} was exported twice")
            tensors[name] = t.detach().contiguous()
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        fsync_path(directory / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors, bucket  # before the next bucket is built: one bucket alive here, not two
    return weight_map


def publish_shards(directory: str | Path, out_dir: str | Path, weight_maps: Iterable[dict[str, str]],
                   config_dir: str | Path, extra_files: Iterable[str | Path] = ()) -> Path:
    """Finish a staged directory whose writers have ALL returned: merge their name -> file maps
    into ``model.safetensors.index.json`` (a name written twice is an error), copy the config files
    of ``config_dir`` and ``extra_files`` (e.g. the tokenizer's), fsync, and rename it to
    ``out_dir``, replacing an existing one. On any error the staged directory is deleted and
    ``out_dir`` keeps what it had: a reader sees the old or the new complete directory, never half."""
    directory, out_dir = Path(directory), Path(out_dir)
    try:
        weight_map: dict[str, str] = {}
        for part in weight_maps:
            duplicate = set(part) & set(weight_map)
            if duplicate:
                raise ValueError(f"tensor {sorted(duplicate)[0]!r} was exported twice")
            weight_map.update(part)
        if not weight_map:
            raise ValueError("no tensor was written")
        total = sum((directory / f).stat().st_size for f in set(weight_map.values()))
        index_file = directory / INDEX_FILE
        index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(
            weight_map.items()))}, indent=1))
        fsync_path(index_file)
        for path in [Path(config_dir) / n for n in HF_CONFIG_FILES if (Path(config_dir) / n).is_file()] + [
                Path(p) for p in extra_files]:
            shutil.copyfile(path, directory / path.name)
            fsync_path(directory / path.name)
        fsync_path(directory)
        replace_dir(directory, out_dir)  # atomic: the engine sees all or nothing
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return out_dir


def discard_stage(directory: str | Path) -> None:
    """Delete a staging directory that will not be published (a writer failed)."""
    shutil.rmtree(directory, ignore_errors=True)


def write_hf_checkpoint(
    buckets: Iterable[list[tuple[str, torch.Tensor]]], out_dir: str | Path, config_dir: str | Path,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """One writer's whole HF directory: :func:`stage_dir`, :func:`write_shards`, :func:`publish_shards`.

    A crash leaves either nothing at ``out_dir`` or a complete directory (plus a stale ``.tmp-*``
    sibling, removed by the next :func:`stage_dir`). An existing ``out_dir`` is replaced."""
    tmp = stage_dir(out_dir)
    try:
        weight_map = write_shards(buckets, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_shards(tmp, out_dir, [weight_map], config_dir, extra_files)


# ------------------------------------------------------------------------------------- distributed
class UpdateGroup:
    """A process group of its own (not the trainer's default group) for weight broadcasts.

    Rank 0 hosts the TCP store. The store keys match what ``init_process_group(init_method=
    f"tcp://{addr}:{port}", group_name=…)`` uses (``{group_name}/{device}/``), which is how SGLang
    joins in ``/init_weights_update_group``, so either side may be SGLang. Construction blocks until
    all ``world_size`` ranks have joined.

    ``bind_host`` (gloo only): the address this rank's gloo sockets listen on. Our server passes the
    host it serves on, so joining a group opens no listener on other interfaces; None keeps gloo's
    default device (the address the machine's hostname resolves to).
    """

    def __init__(
        self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
        backend: str = "nccl", timeout_s: float = 600.0, bind_host: str | None = None,
    ) -> None:
        timeout = timedelta(seconds=timeout_s)
        # Rank 0's store must live as long as the group: keep a reference.
        self.store = dist.TCPStore(
            master_address, master_port, world_size, is_master=(rank == 0), timeout=timeout,
            wait_for_workers=False,
        )
        device = "cpu" if backend == "gloo" else "cuda"
        prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", self.store))
        if backend == "gloo" and bind_host:
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
            options._timeout = timeout
            self.backend = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
        elif backend == "gloo":
            self.backend = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        elif backend == "nccl":
            self.backend = dist.ProcessGroupNCCL(prefixed, rank, world_size)
        else:
            raise ValueError(f"backend: expected gloo or nccl, got {backend!r}")
        self.rank, self.world_size, self.name = rank, world_size, group_name

    def broadcast(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Broadcast each tensor from ``src``, in order (receivers allocate from the metadata)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        for tensor in tensors:
            self.backend.broadcast([tensor], opts).wait()

    def close(self) -> None:
        self.backend = None
        self.store = None


class TicketLock:
    """First come, first served mutual exclusion between processes, kept in a torch ``Store``.

        with TicketLock(store, "sync7"):   # one holder at a time across every process of the store
            ...

    ``store.add`` hands out tickets 1, 2, 3 … atomically; ticket t waits for the key ``turn{t}``,
    which the holder of ticket t − 1 sets when it leaves (ticket 1 goes at once). SGLang receives a
    weight broadcast in its (single) scheduler thread, so two trainer ranks broadcasting into two
    update groups at once could each hold one engine the other waits for: a deadlock. slime takes a
    Ray lock around every bucket for the same reason. A holder must never wait for another trainer
    rank (only for the engines), so the lock cannot deadlock the trainer either.
    """

    def __init__(self, store: dist.Store, prefix: str, timeout_s: float = 600.0) -> None:
        self.store, self.prefix, self.timeout = store, prefix, timedelta(seconds=timeout_s)
        self.ticket = 0

    def __enter__(self) -> TicketLock:
        self.ticket = int(self.store.add(f"{self.prefix}/next", 1))
        if self.ticket > 1:
            key = f"{self.prefix}/turn{self.ticket}"
            self.store.wait([key], self.timeout)
            self.store.delete_key(key)
        return self

    def __exit__(self, *exc) -> None:
        self.store.set(f"{self.prefix}/turn{self.ticket + 1}", "1")


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: SGLang's metadata spelling (no ``torch.`` prefix)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: expected torch dtype names such as 'bfloat16', got {name!r}")
    return dtype


# ------------------------------------------------------------------------------------------- tensor
def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """One ``serialized_named_tensors`` entry (SGLang's default load_format): base64 pickle."""
    if any(t.is_cuda for _, t in named):
        from torch.multiprocessing.reductions import ForkingPickler  # registers the CUDA-IPC reducers

        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(named)
        payload = buffer.getvalue()
    else:
        payload = pickle.dumps([(name, t.detach().contiguous()) for name, t in named])
    return base64.b64encode(payload).decode("ascii")


def _load_storage(data: bytes):
    # torch pickles a CPU storage as torch.save bytes; read them back with the weights-only loader.
    return torch.load(io.BytesIO(data), weights_only=True)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles ``[(name, tensor)]`` and refuses anything else (a pickle can run arbitrary code)."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in serialized_named_tensors")
        return self.ALLOWED[(module, name)]


def deserialize_named_tensors(entry: str) -> list[tuple[str, torch.Tensor]]:
    named = _TensorsOnlyUnpickler(io.BytesIO(base64.b64decode(entry))).load()
    if not (isinstance(named, list) and all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
        for x in named
    )):
        raise ValueError("serialized_named_tensors: expected a pickled list of (name, tensor) pairs")
    return named
