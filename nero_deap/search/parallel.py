"""Where evaluations run: the map function and each worker's device.

Under ``python -m scoop ... run.py`` the map is ``scoop.futures.map``;
otherwise the builtin serial ``map``.  :func:`get_map` is the one place to
plug in another engine.  Each worker process claims a GPU slot with a lock
file (``--workers-per-gpu`` slots per GPU) and falls back to the CPU when
the host has no GPU (``--device cuda`` claims the same way but requires a
GPU).  Lock files are named by the GPU's UUID, not its index, so jobs with
different ``CUDA_VISIBLE_DEVICES`` on one host do not collide.  The claimed
GPU becomes the process's current device (``torch.cuda.set_device``), so
code that uses "the current GPU" (AutoAttack's seeding) uses it too.

Under SCOOP, :func:`patch_scoop` (which ``run.py`` applies in every SCOOP
process) fixes scoop 0.7.2's re-sending of futures that are still running
and counts the re-sends, and gives each idle process one evaluation at a
time (:func:`_patch_dispatch`); see their docstrings.
"""
from __future__ import annotations

import fcntl
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable


class FatalDeviceError(RuntimeError):
    """This process cannot use its device (any more): stop the run rather than score candidates (0, 0).

    A CUDA error other than out-of-memory leaves the process's CUDA context
    unusable; every later evaluation on it would fail.
    """


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


def gpu_key(index: int) -> str:
    """A name for GPU ``index`` that is the same whatever ``CUDA_VISIBLE_DEVICES`` says: its UUID."""
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001 - no UUID (old driver, stand-in): the index is the best we have
        return f"gpu{index}"
    return re.sub(r"[^A-Za-z0-9-]", "_", uuid)


def _use_gpu(device: str) -> str:
    """Make ``device`` (``cuda:N``) this process's current GPU; a GPU that is not there is fatal."""
    import torch

    try:
        torch.cuda.set_device(torch.device(device))
    except Exception as exc:  # noqa: BLE001 - no such GPU, no CUDA build, a broken driver
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FatalDeviceError(f"device {device}: {reason}") from None
    return device


def _try_lock(path: Path):
    """The open, exclusively locked file at ``path``, or None when another process holds it."""
    handle = None
    try:
        handle = open(path, "w")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        if handle is not None:
            handle.close()
        return None
    return handle


def claim_device(requested: str = "auto", workers_per_gpu: int = 1) -> str:
    """A device string for this process: ``cuda:N`` as asked, or a free GPU slot (``auto``, ``cuda``),
    or 'cpu' (``auto`` on a host without GPU).  ``cuda`` without a GPU raises :class:`FatalDeviceError`."""
    global _slot_handle, _claimed
    if requested not in ("auto", "cuda"):
        return _use_gpu(requested) if requested.startswith("cuda") else requested
    if _claimed is not None:
        return _claimed
    import torch

    if not torch.cuda.is_available():
        if requested == "cuda":
            raise FatalDeviceError("--device cuda: no CUDA GPU is visible to this process")
        _claimed = "cpu"
        return _claimed
    lock_dir = Path(os.environ.get("NERO_DEAP_LOCKS", Path(tempfile.gettempdir()) / "nero_deap_gpu_slots"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    count = torch.cuda.device_count()
    for slot in range(max(1, workers_per_gpu)):
        for gpu in range(count):
            handle = _try_lock(lock_dir / f"{gpu_key(gpu)}-slot{slot}.lock")
            if handle is not None:
                _slot_handle, _claimed = handle, _use_gpu(f"cuda:{gpu}")
                return _share_memory(_claimed, workers_per_gpu)
    _claimed = _use_gpu(f"cuda:{os.getpid() % count}")  # more workers than slots: share, but spread
    return _share_memory(_claimed, workers_per_gpu)


SHARED_GPU_MEMORY = 0.95  # of a GPU's memory, split evenly between the workers that share it


def _share_memory(device: str, workers_per_gpu: int) -> str:
    """Cap this worker's share of ``device``'s memory when ``workers_per_gpu`` > 1.

    Without a cap one worker's caching allocator can take the whole GPU, and its neighbour's next cuBLAS
    or cuDNN call fails (``*_STATUS_ALLOC_FAILED``) on a candidate that would have fitted.  With it, a
    candidate too big for its share fails alone, as out of memory (status ``oom``).
    """
    if workers_per_gpu > 1:
        import torch

        torch.cuda.set_per_process_memory_fraction(SHARED_GPU_MEMORY / workers_per_gpu, torch.device(device))
    return device


# ------------------------------------------------------------------ SCOOP
_resent = 0  # futures this process (the root) re-sent since the last resent_count()
_last_report = 0.0
REPORT_EVERY_S = 5.0  # at most one extra status report per this many seconds
STATUS_REPORT_PERIOD_S = 10  # scoop's TIME_BETWEEN_STATUS_REPORTS (25 s), well inside the broker's 60 s


def _count_resends(record) -> bool:
    """A logging filter on scoop's logger: count its 'Lost track of future ... Resending' warnings."""
    global _resent
    if str(record.msg).startswith("Lost track of future"):
        _resent += 1
    return True


def resent_count() -> int:
    """How many futures SCOOP re-sent since the last call (0 outside SCOOP)."""
    global _resent
    count, _resent = _resent, 0
    return count


def _pickled_ids(ids) -> set:
    """Future ids as the broker keys them: pickled, as scoop pickles them in its TASK messages."""
    import pickle

    return {pickle.dumps(i, pickle.HIGHEST_PROTOCOL) for i in ids}


class _StatusReportPickle:
    """scoop's ``pickle`` inside ``scoop._comm.scoopzmq``, except that the set of future ids a status
    report pickles (the only set that module pickles) is sent as pickled ids, which the broker can match."""

    def __init__(self):
        import pickle

        self._pickle = pickle

    def __getattr__(self, name):
        return getattr(self._pickle, name)

    def dumps(self, obj, *args, **kwargs):
        if isinstance(obj, set):
            obj = _pickled_ids(obj)
        return self._pickle.dumps(obj, *args, **kwargs)


class _SnapshotSet(set):
    """A set whose iteration walks a copy: scoop's reporter thread iterates ``inprogress`` while the main
    thread adds and removes running futures ("Set changed size during iteration" would end that thread).
    ``list(set)`` runs in C under the GIL, so taking the copy is atomic."""

    def __iter__(self):
        return iter(list(set.__iter__(self)))


def _report_status(queue) -> None:
    """Tell the broker which futures this worker holds, the running ones included (scoop's STATUS_UPDATE)."""
    global _last_report
    import pickle
    import time

    from scoop._comm import scoopzmq

    now = time.time()
    if now - _last_report < REPORT_EVERY_S:
        return
    _last_report = now
    fids = _pickled_ids(f.id for f in list(queue.movable) + list(queue.ready) + list(queue.inprogress))
    try:
        queue.socket.socket.send_multipart([scoopzmq.STATUS_UPDATE, pickle.dumps(fids)])
    except Exception:  # noqa: BLE001 - a missed report only risks a re-send, which scoop survives
        pass


def patch_scoop() -> None:
    """Stop scoop 0.7.2 from re-sending futures that are still running; count the re-sends that remain.

    Why a fault-free run re-sent futures ("Lost track of future ... Resending
    it"): while the root waits for results it asks the broker, every 2 s,
    where each of its futures is.  The broker answers "nowhere", and the root
    re-sends the future, so a second process evaluates the same candidate,
    when the future is not in the set the worker last reported, or when the
    worker has not reported for 60 s (``TIME_BETWEEN_STATUS_PRUNING``).
    Workers report from a thread every 25 s (``TIME_BETWEEN_STATUS_REPORTS``),
    and three bugs make that answer wrong for a future that is running:

    1. the report holds the ids themselves, while the broker keys futures by
       their *pickled* ids, so after a worker's first report none of its
       futures is ever found;
    2. the report lists only *queued* futures, not the one running;
    3. the first report comes 25 s after the worker started, and until then
       the broker forgets the worker's futures at every status request.

    So any evaluation still running when the root began to wait was
    evaluated twice.  Here, in every SCOOP process: reports carry pickled ids
    (1); a running future is put in the queue's ``inprogress`` set, which
    scoop empties when the future ends, so reports list it (2); a worker
    reports as soon as it starts a future, and every 10 s after its first
    report (3).  A worker that really died still has its futures re-sent; the
    root counts the re-sends (:func:`resent_count`, gens.csv's ``resent``).
    """
    import scoop
    import scoop._control as control
    from scoop._comm import scoopzmq

    if getattr(control.runFuture, "nero_deap_patched", False):
        return
    run_future = control.runFuture

    def runFuture(future):  # noqa: N802 - scoop's name
        queue = control.execQueue
        if queue is not None:
            if not isinstance(queue.inprogress, _SnapshotSet):
                queue.inprogress = _SnapshotSet(queue.inprogress)
            queue.inprogress.add(future)
            _report_status(queue)
        return run_future(future)

    runFuture.nero_deap_patched = True
    control.runFuture = runFuture
    scoopzmq.pickle = _StatusReportPickle()
    scoop.TIME_BETWEEN_STATUS_REPORTS = STATUS_REPORT_PERIOD_S
    scoop.logger.addFilter(_count_resends)
    _patch_dispatch()


def _patch_dispatch() -> None:
    """One evaluation per idle process: stop scoop 0.7.2 from stacking two on one process while others idle.

    Why (looked for after a GPU search, 2026-11-27, where a generation of 7 candidates on 8 workers took
    117 s and its longest candidate trained and was audited in 49 s; which process ran which candidate was
    not recorded, so how much of that this explains is not known): scoop's broker hands a task to the
    processes that asked for one, first come first served, and a process asks each time it looks for work.
    The root looks each time a result comes back, so its requests pile up in the broker while it waits, and
    several of the next generation's tasks go to the root, to run one after another, while workers sit
    idle; the root also keeps the last task of every ``map`` for itself.  On a toy map of tasks of
    0.2-1.6 s (``bench/bench_dispatch.py``, BENCHMARKS.md), a round of 4 tasks on 4 processes ran 0.54 s
    past its longest task on average with scoop's dispatch, 0.003 s with this patch; 7 tasks on 8, 0.20 s
    and 0.004 s (tests/test_gpu_ready.py has the check).

    Here every process has at most one request outstanding, as a worker's own loop already ensures, and
    the root sends every task it creates to the broker, taking its share through a request like any
    worker.  With one process (``-n 1``) scoop keeps everything local, and so does this.  Not strictly
    one: scoop also asks for work when the broker answers a status request with "still queued", and sends
    one request per broker; both only fall back to the old behaviour.  The price: a task the root runs
    itself makes a round trip through the broker (pickled both ways).
    """
    import math

    import scoop
    from scoop._types import FutureQueue

    if getattr(FutureQueue.append, "nero_deap_patched", False):
        return
    append, request = FutureQueue.append, FutureQueue.requestFuture

    def patched_append(self, future):
        if not future._ended() and future.greenlet is None:  # a task, not a result or a running future
            if getattr(future, "nero_deap_sent", False) or future.id[0] != scoop.worker:
                self.nero_deap_requested = False  # from the broker: this process's request was answered
            elif scoop.IS_ORIGIN and self.highwatermark != math.inf:
                future.nero_deap_sent = True  # one the root just created: to the broker, for whoever asks
                self.socket.sendFuture(future)
                return
        append(self, future)

    def patched_request(self):
        if not getattr(self, "nero_deap_requested", False):
            self.nero_deap_requested = True
            request(self)

    patched_append.nero_deap_patched = True
    FutureQueue.append, FutureQueue.requestFuture = patched_append, patched_request
