"""Host memory: let the C allocator keep freed blocks instead of handing them back to the OS.

Why: with glibc's defaults every block over its mmap threshold (at most
32 MiB, and 128 KiB until the threshold adapts) is a fresh ``mmap``, and
every ``free`` of it a ``munmap``.  A CPU training step allocates and frees
activations and gradients of tens of MiB each (a bf16 256 x 128 x 32 x 32
batch is 32 MiB), so each step page-faults through every one of them again,
zero-filling pages the step then overwrites.  On the 2-core Xeon VM of
BENCHMARKS.md this cost about 40% of the engine's time: the reference
network trained at 321-351 images/s with the defaults and at about 600
with blocks kept (``bench/bench_engine.py``, 2026-11-26).  No number changes:
only where memory comes from.  The price: a process keeps the peak of its
heap (the largest candidate's step) until it exits, which evaluation
workers do anyway.

glibc only (``mallopt``); elsewhere (musl, macOS) it does nothing.
Environment variables set by the user (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, an ``LD_PRELOAD``-ed jemalloc/tcmalloc) win.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_applied: dict = {}


def keep_freed_memory() -> bool:
    """Once per process: no mmap for big blocks, no trimming of the heap.  Returns whether it applied."""
    if "result" not in _applied:
        _applied["result"] = _apply()
    return _applied["result"]


def _apply() -> bool:
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
