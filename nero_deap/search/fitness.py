"""Fitness: train a candidate normally, then measure the run's objectives on validation.

:func:`evaluate_remote` is what the parallel map calls: it takes a genotype
and an :class:`EvalContext` and returns plain floats and a metadata dict,
never a model.  The objectives (``ctx.objectives``, clean and FGSM accuracy
by default) come from :mod:`nero_deap.search.objectives`.  Every failure (out of
memory, NaN loss, a network the decoder rejects, any exception) yields the
worst value of every objective with the reason recorded; it never kills
the run.  The one exception is a device error
other than out-of-memory (a CUDA error, an illegal memory access, a
device-side assert): it leaves the process's CUDA context unusable, so
every later candidate on that worker would fail too.  That raises
:class:`~nero_deap.search.parallel.FatalDeviceError`, naming the candidate, host,
process and device, in this and every later evaluation of the process; the
search stops with the last generation checkpointed.  Data and grammar are
loaded once per worker process, lazily.  With ``return_weights`` the
trained model travels back as bytes, so the search keeps the exact weights
it scored (workers on other hosts need no shared file system).
"""
from __future__ import annotations

import faulthandler
import gc
import json
import os
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..engine.threat import EPS
from ..space.dialect import NetworkError
from ..space.genotype import to_phenotype
from ..space.grammar import Grammar
from ..space.structure import NetworkStructure
from . import objectives as objs
from .objectives import DEFAULT_AUDIT, DEFAULT_OBJECTIVES
from .parallel import FatalDeviceError, claim_device

_WORKER_CACHE: dict = {}
# RuntimeError texts of device errors that poison the CUDA context (torch.AcceleratorError is one too)
FATAL_DEVICE_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                        "illegal memory access", "NCCL error")
# ... except these, which say memory ran out: cuBLAS/cuDNN report it as *_STATUS_ALLOC_FAILED when another worker
# on the same GPU holds the memory (--workers-per-gpu > 1); the context stays usable, the candidate is "oom"
OUT_OF_MEMORY_MARKERS = ("out of memory", "ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or any(marker in str(exc) for marker in OUT_OF_MEMORY_MARKERS)


@dataclass(frozen=True)
class EvalContext:
    """Everything a worker needs to evaluate a genotype; small and picklable."""

    grammar_path: str
    structure_json: str = "{}"  # NetworkStructure.to_config() as JSON: hashable, picklable
    data: str = "cifar10"
    val_size: Optional[int] = None
    train_subset: Optional[int] = None
    split_seed: int = 0
    epochs: float = 1.0
    max_seconds: Optional[float] = None
    eps: float = EPS
    device: str = "auto"
    workers_per_gpu: int = 1
    threads: Optional[int] = None
    run_seed: int = 0
    eval_batch_size: int = 500
    accelerate: Optional[bool] = None  # TrainSettings.accelerate: None = bf16/channels_last on CUDA only
    return_weights: bool = False  # send the trained model back in meta["weights"] (export format bytes)
    inflight_dir: Optional[str] = None  # where each process notes the candidate it is evaluating (see in_flight)
    cache_dir: str = ""  # the launching host's data cache: workers on other hosts do not inherit its environment
    objectives: str = DEFAULT_OBJECTIVES  # comma list of objective names (nero_deap.search.objectives)
    audit: str = DEFAULT_AUDIT  # the masking audit's attack (nero_deap.search.audit), "none" = off
    audit_n: int = 0  # validation images the audit attacks (a fixed seeded sample), 0 = all
    pause_at: Optional[float] = None  # --fidelity halving: pause (and score) after this share of the budget


def derive_seed(run_seed: int, individual_id: int) -> int:
    """Evaluation seed from run seed and individual id: independent of the worker."""
    return (run_seed * 1_000_003 + individual_id * 7_919 + 17) % (2**31 - 1)


def grammar_and_structure(ctx: EvalContext):
    key = ("grammar", ctx.grammar_path, ctx.structure_json)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = (Grammar.from_file(ctx.grammar_path),
                              NetworkStructure.from_config(json.loads(ctx.structure_json)))
    return _WORKER_CACHE[key]


def worker_raw(spec: str, cache: str = ""):
    """The decoded dataset for a ``--data`` spec, loaded once per process (``cache``: its cache directory)."""
    key = ("raw", spec, cache)
    if key not in _WORKER_CACHE:
        from ..engine.datasets import load_raw

        _WORKER_CACHE[key] = load_raw(spec, cache or None)
    return _WORKER_CACHE[key]


def worker_data(ctx: EvalContext, device: str):
    """The splits on ``device``, made once per process."""
    key = ("data", ctx.data, ctx.val_size, ctx.train_subset, ctx.split_seed, device)
    if key not in _WORKER_CACHE:
        from ..engine.data import make_splits

        _WORKER_CACHE[key] = make_splits(worker_raw(ctx.data, ctx.cache_dir), ctx.val_size, ctx.split_seed,
                                         ctx.train_subset).to(device)
    return _WORKER_CACHE[key]


def evaluate_phenotype(phenotype, ctx: EvalContext, seed: int, snapshot: Optional[bytes] = None) -> tuple:
    """Train and score one phenotype; returns (objective values, meta).

    With ``ctx.pause_at`` a fresh training pauses there: ``meta["fidelity"]`` is the share of the budget
    trained and ``meta["snapshot"]`` what ``snapshot`` takes to finish it (then ``fidelity`` is 1.0 and the
    weights, if asked for, come back)."""
    import torch

    from ..engine.train import TrainSettings, train
    from ..nets.network import build_network

    if "fatal" in _WORKER_CACHE:  # an earlier device error: nothing this process computes can be trusted
        raise FatalDeviceError(_WORKER_CACHE["fatal"])
    meta = {"params": 0, "flops": 0, "epochs": 0.0, "train_s": 0.0, "status": "ok", "reason": "", "fidelity": 1.0}
    device = claim_device(ctx.device, ctx.workers_per_gpu)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    model = None
    try:
        data = worker_data(ctx, device)
        torch.manual_seed(seed)
        model = build_network(phenotype, data.num_classes, data.image_shape, data.mean, data.std).to(device)
        meta["params"], meta["flops"] = model.params, model.flops
        result = train(model, phenotype.learning, data.train_x, data.train_y,
                       TrainSettings(epochs=ctx.epochs, max_seconds=ctx.max_seconds, seed=seed,
                                     accelerate=ctx.accelerate, pause_at=None if snapshot else ctx.pause_at),
                       resume=snapshot)
        meta["epochs"], meta["train_s"] = round(result.epochs, 4), result.seconds
        meta["fidelity"] = result.budget_fraction  # unrounded: below 1 exactly when training paused
        if result.capped:
            meta["reason"] = f"time cap after {result.epochs:.2f} epochs"
        chosen = objs.parse(ctx.objectives)
        values = objs.measure(chosen, model, objs.Measure(data.val_x, data.val_y, ctx.eps, ctx.eval_batch_size,
                                                          seed))
        if result.snapshot is not None:
            meta["snapshot"] = result.snapshot
        elif ctx.return_weights:
            from ..nets.export import model_bytes

            scores = {f"val_{o.name}": v for o, v in zip(chosen, values)}
            meta["weights"] = model_bytes(model, num_classes=data.num_classes, in_shape=data.image_shape,
                                          mean=data.mean, std=data.std,
                                          info={"seed": seed, **scores, "epochs": meta["epochs"], "stage": "search"})
        return values, meta
    except Exception as exc:  # noqa: BLE001 - a failed candidate must never kill the run
        if is_fatal_device_error(exc):
            _WORKER_CACHE["fatal"] = f"{where(device)}: {type(exc).__name__}: {_first_line(exc)}"
            raise FatalDeviceError(_WORKER_CACHE["fatal"]) from None
        meta["status"], meta["reason"] = failure_reason(exc)
        meta["fidelity"] = 1.0  # a failure is final: going on would fail the same way
        if meta["status"] == "error":
            meta["reason"] += " | " + traceback.format_exc(limit=2).strip().splitlines()[-1][:200]
        return objs.failed_values(objs.parse(ctx.objectives)), meta
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available() and "fatal" not in _WORKER_CACHE:
            torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def where(device: str) -> str:
    """'worker HOST pid N on DEVICE': which worker, for messages that must lead a user to it."""
    return f"worker {socket.gethostname()} pid {os.getpid()} on {device}"


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device error after which this process's CUDA context is unusable (out-of-memory is not one)."""
    import torch

    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in FATAL_DEVICE_MARKERS)


def failure_reason(exc: Exception) -> tuple:
    from ..engine.train import Diverged

    if is_out_of_memory(exc):
        return "oom", "out of memory"
    if isinstance(exc, Diverged):
        return "diverged", str(exc)
    if isinstance(exc, NetworkError):
        return "invalid", str(exc)
    return "error", f"{type(exc).__name__}: {exc}"[:300]


def marker_path(inflight_dir: str) -> Path:
    """This process's note of what it is evaluating: ``<inflight_dir>/<host>-<pid>.json``."""
    return Path(inflight_dir) / f"{socket.gethostname()}-{os.getpid()}.json"


@contextmanager
def in_flight(ctx: EvalContext, individual, phenotype_text: str):
    """Note the candidate on disk while it is evaluated, so a process that dies by a signal is traceable.

    A segfault or heap corruption inside a native kernel (oneDNN's, once)
    kills the process before any Python handler runs; the note survives it and
    :func:`died_in_flight` names the candidate on the next start.
    ``faulthandler`` prints the Python stack of the crash to stderr.
    """
    if not faulthandler.is_enabled():
        faulthandler.enable()
    if ctx.inflight_dir is None:
        yield
        return
    path = marker_path(ctx.inflight_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": individual.id, "gen": getattr(individual, "gen", None),
                                "host": socket.gethostname(), "pid": os.getpid(), "phenotype": phenotype_text}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive_here(host: str, pid) -> bool:
    """Whether ``pid`` on ``host`` may still be running (always True for other hosts: we cannot tell).

    A zombie is dead: a SCOOP worker killed by SIGKILL stays a zombie child of
    ``scoop.launch`` until it is reaped, and ``os.kill(pid, 0)`` still
    succeeds on it, so its in-flight note once stayed and no "died while
    evaluating" line appeared.  ``/proc/PID/stat``'s state says ``Z``."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    return not is_zombie(int(pid))


def is_zombie(pid: int) -> bool:
    """Whether process ``pid`` has ended but not been reaped (Linux's ``/proc``; False where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"  # the state follows the command name, which may hold spaces


def died_in_flight(inflight_dir: str, run_is_live: bool = False) -> list:
    """Notes left by processes that died while evaluating, removed once read: dicts with id, gen, phenotype.

    At start-up (``run_is_live`` False) every note is stale.  While the run
    goes on (SCOOP workers), only notes of this host's processes that no
    longer exist are.
    """
    folder = Path(inflight_dir)
    notes = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            note = None
        unknown = {"id": "?", "gen": "?", "host": "?", "pid": "?", "phenotype": f"(unreadable {path.name})"}
        note = {**unknown, **note} if isinstance(note, dict) else unknown  # JSON that is not all of our note
        if run_is_live and _alive_here(note.get("host"), note.get("pid")):
            continue
        notes.append(note)
        path.unlink(missing_ok=True)
    return notes


def evaluate_remote(individual, ctx: EvalContext, snapshot: Optional[bytes] = None) -> tuple:
    """The mapped function: genotype in, (objective values, meta) out (``snapshot``: finish a paused training)."""
    start = time.perf_counter()
    grammar, structure = grammar_and_structure(ctx)
    phenotype = to_phenotype(individual, grammar, structure)
    try:
        with in_flight(ctx, individual, phenotype.to_text()):
            fitness, meta = evaluate_phenotype(phenotype, ctx, derive_seed(ctx.run_seed, individual.id), snapshot)
    except FatalDeviceError as exc:
        raise FatalDeviceError(f"candidate {individual.id}: {exc}") from None
    meta["eval_s"] = time.perf_counter() - start
    return fitness, meta


def resume_remote(individual, snapshot: bytes, ctx: EvalContext) -> tuple:
    """The mapped function of ``--fidelity halving``'s second rung: finish the paused training, score again."""
    return evaluate_remote(individual, ctx, snapshot)


def evaluate(individual, ctx: EvalContext) -> tuple:
    """DEAP-style: returns the objective values and attaches ``individual.meta``."""
    fitness, meta = evaluate_remote(individual, ctx)
    individual.meta = meta
    return fitness


__all__ = ["EvalContext", "evaluate", "evaluate_remote", "resume_remote", "evaluate_phenotype", "derive_seed"]
