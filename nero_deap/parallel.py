"""Where evaluations run: the map function and each worker's device.

Under ``python -m scoop ... run.py`` the map is ``scoop.futures.map``;
otherwise the builtin serial ``map``.  :func:`get_map` is the one place to
plug in another engine.  Each worker process claims a GPU slot with a lock
file (``--workers-per-gpu`` slots per GPU) and falls back to the CPU when
the host has no GPU.
"""
from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

_slot_handle = None  # the open, locked slot file: held for the process lifetime
_claimed = None


def running_under_scoop() -> bool:
    scoop = sys.modules.get("scoop")
    return bool(scoop is not None and getattr(scoop, "IS_RUNNING", False))


def get_map() -> Callable:
    if running_under_scoop():
        from scoop import futures

        return futures.map
    return map


def claim_device(requested: str = "auto", workers_per_gpu: int = 1) -> str:
    """A device string for this process: the request, or a free GPU slot, or 'cpu'."""
    global _slot_handle, _claimed
    if requested != "auto":
        return requested
    if _claimed is not None:
        return _claimed
    import torch

    if not torch.cuda.is_available():
        _claimed = "cpu"
        return _claimed
    lock_dir = Path(os.environ.get("NERO_DEAP_LOCKS", Path(tempfile.gettempdir()) / "nero_deap_gpu_slots"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    count = torch.cuda.device_count()
    for slot in range(max(1, workers_per_gpu)):
        for gpu in range(count):
            handle = open(lock_dir / f"gpu{gpu}-slot{slot}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _slot_handle, _claimed = handle, f"cuda:{gpu}"
            return _claimed
    _claimed = f"cuda:{os.getpid() % count}"  # more workers than slots: share, but spread
    return _claimed
