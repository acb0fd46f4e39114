"""The transport halves of SGLang's three weight-update paths, shared by the client and our server.

The trainer hands this layer a stream of (HF name, tensor) (``parallel/export.py``) cut into
:func:`bucket_by_bytes` buckets.

(a) disk: :func:`write_hf_checkpoint` writes an HF safetensors directory next to its final name
    and renames it into place, so ``/update_weights_from_disk`` never sees a half-written one.
(b) distributed: an :class:`UpdateGroup` is the process group that
    ``/init_weights_update_group`` creates inside SGLang (trainer = rank 0, engine ranks from
    ``rank_offset``), with the same store keys as ``torch.distributed.init_process_group(
    init_method="tcp://…", group_name=…)``, without touching the trainer's default group; the
    tensors of each bucket then travel by ``broadcast`` from rank 0 in the order of ``names``.
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


def write_hf_checkpoint(
    buckets: Iterable[list[tuple[str, torch.Tensor]]], out_dir: str | Path, config_dir: str | Path,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Write one safetensors shard per bucket plus ``model.safetensors.index.json``, the config
    files of ``config_dir`` and ``extra_files`` (e.g. the tokenizer's, for a directory other runs
    start from), into a temporary sibling that is renamed to ``out_dir`` at the end.

    A crash leaves either nothing at ``out_dir`` or a complete directory (plus a stale
    ``.tmp-*`` sibling). An existing ``out_dir`` is replaced: moved aside, then deleted.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for index, bucket in enumerate(buckets):
            if not bucket:
                continue
            shard = f"model-{index + 1:05d}.safetensors"
            # save_file refuses tensors that share storage (views such as a split fused qkv): clone.
            tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in bucket}
            duplicate = set(tensors) & set(weight_map)
            if duplicate:
                raise ValueError(f"tensor {sorted(duplicate)[0]!r} was exported twice")
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            fsync_path(tmp / shard)
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index_file = tmp / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        fsync_path(index_file)
        for name in HF_CONFIG_FILES:
            if (Path(config_dir) / name).is_file():
                shutil.copyfile(Path(config_dir) / name, tmp / name)
                fsync_path(tmp / name)
        for path in map(Path, extra_files):
            shutil.copyfile(path, tmp / path.name)
            fsync_path(tmp / path.name)
        fsync_path(tmp)
        replace_dir(tmp, out_dir)  # atomic: the engine sees all or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
