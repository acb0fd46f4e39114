"""Peak extra memory of a code region in this process: how the weight-sync memory bound is measured.

    with PeakMemory() as peak:
        sync()
    peak.host_bytes, peak.cuda_bytes        # the most the region held at once above its start

Host: the kernel's own account. Linux keeps the high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0) resets it to the
current resident set. The region's peak is ``VmHWM`` at the end minus ``VmRSS`` at the start: every
page the process touched at once, whoever allocated it (torch tensors, Python bytes, safetensors,
gloo buffers), not what one allocator chooses to report. Two things could hide memory from it, and
both are removed: free heap memory that glibc keeps resident from before the region and hands out
again (``malloc_trim(0)`` returns it to the kernel before the start), and large blocks recycled
inside the heap during the region (run the process with :data:`MMAP_THRESHOLD_ENV`,
``MALLOC_MMAP_THRESHOLD_=4096``, so that every block of a page or more is its own mapping, given
back to the kernel when freed; :func:`mmap_threshold_set` says whether it is). What remains is
what the code held, to the granularity of the kernel's resident-set counter (per-CPU batches of
pages: tens of KiB), plus the small blocks of the Python and allocator bookkeeping.

CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
``memory_allocated()`` at the start (the caching allocator's exact count of live tensor bytes).
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import torch

MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096"}  # the environment a measured process needs


def mmap_threshold_set() -> bool:
    """True when glibc was told to map every block of 64 KiB or more on its own (module docstring)."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return value is not None and value.isdigit() and int(value) <= 65536


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_host_peak() -> int | None:
    """Release free heap memory, reset the resident high-water mark; the resident set now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status("VmRSS:")


class PeakMemory:
    """Context manager: ``host_bytes`` (None off Linux) and ``cuda_bytes`` (None without CUDA) are
    the peak extra memory of the ``with`` block (module docstring)."""

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.host_bytes: int | None = None
        self.cuda_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._host_start = _reset_host_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_bytes = torch.cuda.max_memory_allocated() - self._cuda_start
        peak = _status("VmHWM:")
        if self._host_start is not None and peak is not None:
            self.host_bytes = max(0, peak - self._host_start)
