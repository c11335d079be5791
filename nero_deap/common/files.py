"""Atomic file writes: a reader, or a run resumed after a kill, sees the old file or the new one, never half.

Every file a run depends on (checkpoints, CSV tables, model weights, the
resolved config) goes through :func:`write_bytes_atomic`: the bytes go to a
temporary file in the same folder, are flushed to disk with ``fsync``, and
replace the target with ``os.replace``, which POSIX makes atomic.  Twenty
kills at random points and at every write point all resumed to tables
identical to an uninterrupted run's.

Every file a run writes gets the permissions the user's umask gives a new
file (0644 under the usual 022), like the CSV rows appended to ``gens.csv``:
the temporary file's private 0600 is widened to that before the rename, so
one rule holds for every output.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less this process's umask (read from ``/proc`` where
    it can be: setting the umask to read it would leave a moment in which another thread's files get 0o666)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``; readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), new_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
