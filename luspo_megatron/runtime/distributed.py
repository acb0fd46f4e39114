"""The one process-group start-up, and the few object collectives the trainer needs.

    init_process_group()          # torchrun's environment, or a world of one for `python tools/...`
    batch = broadcast_object(batch if rank == 0 else None)
    if any_rank(stop_requested): ...

NCCL on a CUDA machine, gloo otherwise (or when asked: conversion is CPU work). megatron-core's
CPU redirections (:mod:`luspo_megatron.runtime.cpu_compat`) are applied first, so that whatever
megatron does next finds them.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_process_group(backend: str | None = None, timeout_minutes: int = 30) -> bool:
    """Start torch.distributed unless it runs already; True when this call started it.

    ``backend`` None: nccl on a CUDA machine, else gloo. Without torchrun's environment
    (a plain ``python tools/...``) the world is this one process.
    """
    from luspo_megatron.runtime import cpu_compat

    cpu_compat.apply(cuda_available=torch.cuda.is_available())  # each fix gated on its own trigger
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:  # torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    else:  # a plain `python tools/...`: a world of one, no port needed
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return True


def rank() -> int:
    """This process's global rank (torchrun's RANK before the group exists; 0 alone)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small control data, never tensors in bulk)."""
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is set on any rank, so that every rank takes the same branch."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    # NCCL reduces device tensors only.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
