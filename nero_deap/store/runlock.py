"""One nero-deap process at a time per run folder.

Why: a second ``search --resume`` (or a ``final``) started on a run that a
search is still writing interleaved two processes' checkpoints, CSV rows and
weights in one folder, and neither noticed.  The lock is advisory
(``fcntl.flock`` on ``<run>/.nero-deap.lock``), held by the process for as
long as it writes there and released by the kernel however it ends, even by
``kill -9``: a stale lock file never blocks anyone.  The file names its
holder for the message the second process prints, and is removed when its
holder ends normally, so a finished run folder holds only results.  Removal
is safe because a process that locked the file checks that it is still the
file at that path; one that locked a file just removed tries again.
"""
from __future__ import annotations

import fcntl
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..common.errors import ConfigError

LOCK_NAME = ".nero-deap.lock"


@contextmanager
def run_lock(run_dir: Path, what: str, option: str = "") -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the folder) while the block runs; ConfigError naming the holder if
    another process has it, or if the folder cannot be written (``option``, e.g. ``--out``, prefixes that)."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    handle, locked = _lock(run_dir, path, option, stacklevel=4)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"nero-deap {what} (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        yield
        if locked:  # a normal end: the folder keeps only results (still holding the lock, so nobody races it)
            path.unlink(missing_ok=True)
    finally:
        handle.close()  # releases the lock


def _lock(run_dir: Path, path: Path, option: str, stacklevel: int) -> tuple:
    """(open lock file, whether it is locked): the file at ``path``, locked by this process, retried when the
    file locked was removed by its previous holder in between."""
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{option + ' ' if option else ''}{run_dir}: cannot write there "
                              f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise ConfigError(f"{run_dir} is in use by {holder}; wait for it to end, or use another folder") \
                from None
        except OSError as exc:  # a file system without locks (some network mounts): go on unguarded, say so
            warnings.warn(f"{run_dir}: cannot lock ({exc.strerror or exc}); make sure no other nero-deap "
                          "process writes there", stacklevel=stacklevel)
            return handle, False
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle, True
        except FileNotFoundError:
            pass
        handle.close()  # locked a file its holder removed on finishing: lock the one at the path now
