"""How much training each new candidate gets: the full budget, or successive halving.

Why: training is almost the whole cost of a search, and most offspring of a
generation end up dominated.  ``--fidelity halving`` (config ``fidelity``)
trains every new candidate for a first share of its budget
(``halving_budget``, a third by default), scores it, and lets only the most
promising share (``halving_keep``, half by default; by non-dominated rank,
then crowding, under the run's constraint) go on to the full budget from
where it stopped.  The continuation is exact (the weights equal an
uninterrupted training's on the CPU; :func:`nero_deap.engine.train.train`), so a
continued candidate is indistinguishable from one trained in one go.

Stopped candidates keep the scores they reached, with their ``fidelity``
(the share of the budget trained) in individuals.csv.  They never enter the
Pareto archive, never have weights kept, and every fully trained candidate
dominates them in selection (:data:`nero_deap.search.evolution.UNDERTRAINED`):
undertrained networks often look more robust to FGSM than they are, and
must not win on that.  A candidate whose first share ended its training
anyway (the time cap, a diverged or failed training) is complete: its scores
are what the full budget gives.

Each mode is one entry of :data:`FIDELITIES`, a plain function over the
toolbox like DEAP's algorithms: ``(individuals, toolbox, constraint,
progress, weights) -> evaluated``.  Everything happens inside one
generation's evaluation, so ``--resume`` (which restarts an unfinished
generation) and SCOOP (snapshots travel as bytes through the map) need
nothing more.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

from deap import tools

from .evolution import Constraint, evaluate_invalid, evaluate_mapped


def halving(individuals: list, toolbox, constraint: Constraint = Constraint(), progress: Optional[Callable] = None,
            weights: Optional[dict] = None, keep: float = 0.5) -> list:
    """Successive halving in two rungs: all at ``toolbox.evaluate``'s first share, the best ``keep`` on to 1.

    ``toolbox.evaluate`` must pause at the first rung (an EvalContext with
    ``pause_at``) and ``toolbox.resume_evaluation(individual, snapshot)`` finish.
    """
    evaluated = evaluate_invalid(individuals, toolbox, constraint, progress, weights)
    snapshots = {ind.id: ind.meta.pop("snapshot") for ind in evaluated if "snapshot" in ind.meta}
    paused = [ind for ind in evaluated if ind.id in snapshots]
    go_on = tools.selNSGA2(list(paused), math.ceil(keep * len(paused))) if paused else []
    resume_from = [snapshots.pop(ind.id) for ind in go_on]
    snapshots.clear()  # the stopped candidates' snapshots: not needed any more, and each holds a whole training
    evaluate_mapped(toolbox.resume_evaluation, go_on, (resume_from,), toolbox, constraint, progress, weights)
    return evaluated


FIDELITIES = {"full": evaluate_invalid, "halving": halving}  # full: every new candidate, the whole budget


def register(toolbox, mode: str, keep: float = 0.5) -> None:
    """``toolbox.evaluate_offspring``: the fidelity mode ``--fidelity`` names (``keep`` for halving)."""
    fn = FIDELITIES[mode]
    toolbox.register("evaluate_offspring", partial(fn, keep=keep) if mode == "halving" else fn)
