"""The masking audit inside the search: archive entrants attacked once more, harder.

Why: the fitness attack (FGSM by default) is one gradient step, and
evolution can raise it by masking gradients (saturating sigmoid/tanh,
low-confidence logits) rather than by becoming robust.  Every individual
about to enter the Pareto archive is therefore scored again, from the very
weights the search trained, with a stronger attack on the validation split:
by default margin-loss PGD-20 (``--audit pgd20``; any robust objective name of
:mod:`nero_deap.search.objectives` works, ``none`` turns the audit off).

The individual is flagged (``masking`` column) when one of its robustness
objectives exceeds the audit accuracy by more than ``--mask-threshold``
(default 0.10, the same gap ``final``'s audit uses for FGSM - PGD-20: our
RESULTS.md fronts showed FGSM above cross-entropy PGD-20 by 3 to 6 points
on honest models, so 10 points is beyond what a step-size effect explains).
The audit is itself a gradient attack, so a network that shatters its input
gradient (rounding or quantising the input) fools it as much as FGSM; it
therefore also measures the share of audited images whose input gradient is
exactly zero or not finite (``zero_grad`` column,
:func:`~nero_deap.engine.attacks.zero_gradient_share`) and flags the
individual when that share exceeds
:data:`ZERO_GRADIENT_SHARE` (5%).  It cannot see
masking that leaves the gradient non-zero but useless (noisy or stochastic
gradients): that is what ``final``'s AutoAttack comparison is for.

With ``--masking penalise`` a flagged individual's robustness objectives are
replaced by its audit accuracy before selection and archiving (by 0 when its
gradient is shattered: no gradient attack then measures it), so evolution
cannot profit from masking; ``flag`` (the default) only records it.

The audit runs where the evaluations run (the toolbox's map), on the model
bytes the workers sent back, so it needs no shared file system.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence, Union

from .evolution import set_fitness
from .fitness import failure_reason, is_fatal_device_error, worker_data
from .objectives import Measure, get
from .parallel import FatalDeviceError, claim_device

MASKING_MODES = ("flag", "penalise")
# Above this share of images with a zero (or non-finite) input gradient, no gradient attack can be trusted.  A
# healthy ReLU network's margin gradient vanishes almost nowhere; a rounded input's vanishes everywhere (share 1).
ZERO_GRADIENT_SHARE = 0.05


@dataclass(frozen=True)
class AuditResult:
    """What a worker's audit measured: accuracy under the audit attack, and the share of the audited images
    whose input gradient is zero or not finite."""

    acc: float
    zero_grad: float = 0.0


@dataclass(frozen=True)
class AuditSettings:
    attack: str = "pgd20"  # a robust objective's name, or "none"
    threshold: float = 0.10
    mode: str = "flag"  # flag | penalise

    @property
    def enabled(self) -> bool:
        return self.attack != "none"


def audit_remote(job: tuple, ctx) -> Union[AuditResult, str]:
    """Worker side: (seed, model bytes) -> accuracy under the audit attack on the validation split, and the
    share of those images with a zero input gradient.

    Returns the reason as a string if the audit itself fails (unreadable bytes, out of memory): an audit
    must never cost the run its candidate, only its flag.
    """
    import torch

    from ..engine.attacks import zero_gradient_share
    from ..nets.export import load_model

    seed, blob = job
    device = claim_device(ctx.device, ctx.workers_per_gpu)
    try:
        model = load_model(blob, map_location=device)
        x, y = audit_sample(worker_data(ctx, device), ctx.audit_n, ctx.split_seed)
        torch.manual_seed(seed)
        acc = float(get(ctx.audit).measure(model, Measure(x, y, ctx.eps, ctx.eval_batch_size, seed), {}))
        return AuditResult(acc, zero_gradient_share(model, x, y, ctx.eval_batch_size))
    except Exception as exc:  # noqa: BLE001 - see the docstring; a broken GPU still stops the search
        if isinstance(exc, FatalDeviceError):
            raise
        if is_fatal_device_error(exc):
            raise FatalDeviceError(f"{device}: masking audit of a model with seed {seed}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        return f"audit failed: {failure_reason(exc)[1]}"[:300]


def timed_audit(job: tuple, ctx) -> tuple:
    """:func:`audit_remote` and the seconds it took on the worker (gens.csv ``audit_s``: the audit's cost)."""
    import time

    start = time.perf_counter()
    result = audit_remote(job, ctx)
    return result, time.perf_counter() - start


def audit_sample(data, n: int, seed: int) -> tuple:
    """The first ``n`` validation images of a fixed seeded shuffle (all when ``n`` is 0 or more than there are).

    The same sample for every candidate of a run, so audit scores compare.  A
    shuffle because the validation split keeps the source's order, which is
    class by class for image folders.  Why a sample at all: margin PGD-20 runs
    in float32 and costs 21 forward and backward passes per image; on 1,000
    images that is about 3.6 times the bf16 training of a CPU-scale candidate
    (bench/bench_objectives.py, BENCHMARKS.md).
    """
    import torch

    total = len(data.val_y)
    if not n or n >= total:
        return data.val_x, data.val_y
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].to(data.val_y.device)
    return data.val_x[pick], data.val_y[pick]


def _add_reason(meta: dict, text: str) -> None:
    """Append to the candidate's ``reason`` column, after what it already says."""
    meta["reason"] = f"{meta['reason']} | {text}" if meta.get("reason") else text


def judge(ind, result: Union[AuditResult, str], objectives: Sequence, settings: AuditSettings) -> tuple:
    """Record the audit in ``ind.meta``; return the fitness values selection should use.

    ``result`` is what the audit measured, or the reason it failed (a string): then nothing is flagged."""
    values = tuple(ind.fitness.values)
    if isinstance(result, str):
        _add_reason(ind.meta, result)
        ind.meta["audit_acc"], ind.meta["zero_grad"], ind.meta["masking"] = float("nan"), float("nan"), False
        return values
    robust = [i for i, o in enumerate(objectives) if o.robust]
    gap = max((values[i] - result.acc for i in robust), default=0.0)
    shattered = result.zero_grad > ZERO_GRADIENT_SHARE
    ind.meta["audit_acc"], ind.meta["zero_grad"] = result.acc, result.zero_grad
    ind.meta["masking"] = gap > settings.threshold or shattered
    if not (ind.meta["masking"] and settings.mode == "penalise"):
        return values
    floor = 0.0 if shattered else result.acc
    penalised = tuple(min(v, floor) if i in robust else v for i, v in enumerate(values))
    note = ", ".join(f"{objectives[i].name} {values[i]:.3f}" for i in robust)
    why = f"zero input gradient on {result.zero_grad:.0%} of audited images" if shattered \
        else f"audit {result.acc:.3f}"
    _add_reason(ind.meta, f"masking penalised: {note} -> {floor:.3f} ({why})")
    return penalised


def make_auditor(map_fn: Callable, ctx, objectives: Sequence, settings: AuditSettings, seed_of: Callable) -> Callable:
    """``toolbox.audit(entrants, constraint, weights)``: audit the entrants whose model bytes are in
    ``weights`` (id -> bytes, as :func:`~nero_deap.search.evolution.evaluate_invalid` left them) and that were
    not audited yet.  The costliest (by forward FLOPs) go out first, as evaluations do
    (:func:`~nero_deap.search.evolution.dispatch_order`); each audit is seeded by its candidate's id."""
    def audit(entrants: list, constraint, weights: dict) -> None:
        todo = [ind for ind in entrants
                if ind.meta.get("status") == "ok" and weights.get(ind.id) and "audit_acc" not in ind.meta]
        todo.sort(key=lambda ind: -ind.meta.get("flops", 0))
        jobs = [(seed_of(ind.id), weights[ind.id]) for ind in todo]
        for ind, (result, seconds) in zip(todo, map_fn(partial(timed_audit, ctx=ctx), jobs)):
            ind.meta["audit_s"] = seconds
            set_fitness(ind, judge(ind, result, objectives, settings), ind.meta, constraint)
    return audit
