"""The search objectives: one registry, the only module that names a particular objective.

Every objective is an :class:`Objective`: a name, a direction, how to measure
it on a trained model, and how to normalise it for the hypervolume.  The
search, the CSV logbooks, the console line, the plots, ``final``'s
selection and ``report`` all iterate over the objectives a run was
configured with (``--objectives clean,fgsm`` by default: NERO-Net's pair).

Built in:

========== ================================================ ==========
name       measures (validation split)                       direction
========== ================================================ ==========
clean      accuracy                                          maximised
fgsm       accuracy under FGSM at eps                        maximised
pgd<K>     accuracy under PGD-K on the CW margin loss,        maximised
           random start, step 2.5*eps/K (e.g. pgd5, pgd10)
params     parameter count                                   minimised
flops      forward FLOPs                                     minimised
========== ================================================ ==========

Adding one: write its measure function, :func:`register` it (or add it to
:data:`OBJECTIVES`), test it.  Nothing else changes.

Hypervolume (:func:`hypervolume`) is computed by moocore (DEAP's own
dependency) on normalised values, all maximised in [0, 1], with the
reference point at the origin: accuracies are used as they are (reference
0); a size ``v`` becomes ``1 - log10(1 + v) / log10(1 + bound)``, clipped to
[0, 1], with ``bound`` 10^8 parameters or 10^11 FLOPs (far above any CIFAR
network a CPU or single GPU trains in a search), so one decade of size
weighs the same anywhere on the scale.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

DEFAULT_OBJECTIVES = "clean,fgsm"
DEFAULT_AUDIT = "pgd20"
CONSTRAINED = "clean"  # the objective --min-clean constrains (NERO-Net's clean-accuracy threshold)


@dataclass(frozen=True)
class Measure:
    """What a measure function gets besides the model: the data and the attack settings."""

    x_u8: object  # uint8 images (torch tensor), N x C x H x W
    y: object
    eps: float
    batch_size: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Objective:
    """One search objective.

    ``measure(model, m, cache)`` returns the raw value; ``cache`` is a dict
    shared by the objectives of one evaluation, so that e.g. clean and FGSM
    accuracy come from one forward/backward pass.  ``robust`` marks accuracies
    under attack: the masking audit compares them with its own attack.
    ``bound`` is the hypervolume normalisation cap of minimised objectives.
    """

    name: str
    label: str
    maximise: bool
    measure: Callable
    robust: bool = False
    bound: Optional[float] = None

    @property
    def weight(self) -> float:
        """DEAP fitness weight: +1 maximised, -1 minimised."""
        return 1.0 if self.maximise else -1.0

    @property
    def column(self) -> str:
        """Its column in individuals.csv/pareto.csv (``clean_acc``, ``fgsm_acc``, ``params`` ...)."""
        return self.name if self.bound is not None else f"{self.name}_acc"

    def normalised(self, value: float) -> float:
        """Larger is better, in [0, 1] (see the module docstring)."""
        if self.bound is None:
            return min(max(float(value), 0.0), 1.0)
        return min(max(1.0 - math.log10(1.0 + max(float(value), 0.0)) / math.log10(1.0 + self.bound), 0.0), 1.0)


# ------------------------------------------------------------------ measures
def _clean_fgsm(model, m: Measure, cache: dict) -> tuple:
    if "clean_fgsm" not in cache:
        from ..engine.attacks import accuracy_clean_fgsm

        cache["clean_fgsm"] = accuracy_clean_fgsm(model, m.x_u8, m.y, m.eps, m.batch_size)
    return cache["clean_fgsm"]


def _clean(model, m: Measure, cache: dict) -> float:
    return _clean_fgsm(model, m, cache)[0]


def _fgsm(model, m: Measure, cache: dict) -> float:
    return _clean_fgsm(model, m, cache)[1]


def pgd_measure(steps: int) -> Callable:
    """Accuracy under margin-loss PGD with ``steps`` steps of 2.5*eps/steps from a random start."""
    def measure(model, m: Measure, cache: dict) -> float:
        from ..engine.attacks import accuracy_pgd

        return accuracy_pgd(model, m.x_u8, m.y, m.eps, steps, 2.5 * m.eps / steps, 1, m.batch_size, m.seed,
                            loss="margin")
    return measure


def _params(model, m: Measure, cache: dict) -> float:
    return float(model.params)


def _flops(model, m: Measure, cache: dict) -> float:
    return float(model.flops)


OBJECTIVES: dict = {
    "clean": Objective("clean", "clean accuracy", True, _clean),
    "fgsm": Objective("fgsm", "FGSM accuracy", True, _fgsm, robust=True),
    "params": Objective("params", "parameters", False, _params, bound=1e8),
    "flops": Objective("flops", "FLOPs", False, _flops, bound=1e11),
}
PGD_NAME = re.compile(r"pgd([1-9][0-9]{0,2})")


def register(objective: Objective) -> Objective:
    """Add an objective to the registry (a plug-in, or a test's dummy)."""
    OBJECTIVES[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    """The objective called ``name``; ``pgd<K>`` (K in 1..999) is made on demand."""
    name = name.strip().lower()
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    match = PGD_NAME.fullmatch(name)
    if match:
        steps = int(match.group(1))
        return Objective(name, f"PGD-{steps} accuracy", True, pgd_measure(steps), robust=True)
    raise ValueError(f"unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))}, pgd<K> e.g. pgd5)")


def parse(spec) -> tuple:
    """``"clean,fgsm"`` (or a list of names) -> objectives; two or more, each once."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if len(names) < 2:
        raise ValueError(f"objectives: give two or more, comma-separated (e.g. {DEFAULT_OBJECTIVES}), got {spec!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives: each objective once, got {spec!r}")
    return tuple(get(n) for n in names)


def names(objectives: Iterable[Objective]) -> str:
    return ",".join(o.name for o in objectives)


def measure(objectives: Sequence[Objective], model, m: Measure) -> tuple:
    """The raw values of ``objectives`` for a trained ``model``, in order."""
    cache: dict = {}
    return tuple(float(o.measure(model, m, cache)) for o in objectives)


def failed_values(objectives: Sequence[Objective]) -> tuple:
    """Fitness of a candidate that could not be evaluated: the worst value of every objective."""
    return tuple(0.0 if o.maximise else float(o.bound) for o in objectives)


def hypervolume(points: Iterable[Sequence[float]], objectives: Sequence[Objective]) -> float:
    """Hypervolume of raw objective vectors, normalised as in the module docstring (reference: origin)."""
    import moocore
    import numpy as np

    rows = [[o.normalised(v) for o, v in zip(objectives, p)] for p in points]
    if not rows:
        return 0.0
    return float(moocore.hypervolume(-np.asarray(rows, dtype=float), ref=np.zeros(len(objectives))))


def robust_indices(objectives: Sequence[Objective]) -> list:
    return [i for i, o in enumerate(objectives) if o.robust]

