"""NSGA-II (mu + lambda) over grammar-encoded CNNs, as plain functions over a toolbox.

Modelled on DEAP's NSGA-II example: ``selTournamentDCD`` picks parents (so
the population is a multiple of 4), offspring are cloned, mated with
probability ``cxpb`` and mutated with probability ``mutpb``, only invalid
individuals are evaluated, and ``selNSGA2`` keeps the best ``mu`` of parents
plus offspring.

No phenotype enters the population twice: the initial population redraws
duplicates, and an offspring whose phenotype is already in the population
(an unchanged clone of its parent, say) or earlier in the same offspring
list is dropped before evaluation.  Parents plus the remaining offspring
therefore hold at least ``mu`` distinct phenotypes, and no id can repeat.
Only a search space smaller than ``mu`` networks defeats the redraws; then
the initial population repeats phenotypes, each under its own id.  A ``tools.ParetoFront`` archive holds every non-dominated
individual seen (``HallOfFame`` would rank by the first objective only).

Objectives are (clean accuracy, FGSM accuracy), both maximised.  With
``min_clean`` (tau) > 0, domination is *constrained*: a feasible individual
(clean >= tau) dominates an infeasible one, and between infeasible ones the
smaller violation wins, mirroring NERO-Net's clean-accuracy threshold.

The DEAP ``creator`` classes are created here, at import, so SCOOP workers
(and checkpoint loading) can unpickle individuals.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from deap import base, creator, tools

from .genotype import Genotype, init_genotype, to_phenotype


class ConstrainedFitness(base.Fitness):
    """Pareto fitness with constrained domination on a stored ``violation``."""

    violation = 0.0  # set per individual by set_fitness; 0 = feasible

    def dominates(self, other, obj=slice(None)):
        if self.violation != other.violation:
            return self.violation < other.violation
        return super().dominates(other, obj)

    def __deepcopy__(self, memo):
        copy_ = super().__deepcopy__(memo)
        copy_.violation = self.violation
        return copy_


if not hasattr(creator, "FitnessCleanFgsm"):
    creator.create("FitnessCleanFgsm", ConstrainedFitness, weights=(1.0, 1.0))
if not hasattr(creator, "Individual"):
    creator.create("Individual", Genotype, fitness=creator.FitnessCleanFgsm)


@dataclass
class SearchState:
    """Everything a checkpoint holds (RNG states are added when saving)."""

    population: list
    archive: tools.ParetoFront
    gen: int = 0
    next_id: int = 0
    gen_rows: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)  # id -> model bytes awaiting store_weights; never checkpointed


def make_toolbox(grammar, structure, rates, evaluate: Callable, map_fn: Callable = map,
                 rng: random.Random = random) -> base.Toolbox:
    """Register init, mate, mutate, select, evaluate and map."""
    from .operators import mate, mutate

    toolbox = base.Toolbox()
    toolbox.register("individual", init_genotype, grammar, structure, rng, creator.Individual)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    toolbox.register("mate", mate, grammar=grammar, structure=structure, rates=rates, rng=rng)
    toolbox.register("mutate", mutate, grammar=grammar, structure=structure, rates=rates, rng=rng)
    toolbox.register("select", tools.selNSGA2)
    toolbox.register("evaluate", evaluate)
    toolbox.register("map", map_fn)
    toolbox.register("phenotype_text", lambda ind: to_phenotype(ind, grammar, structure).to_text())
    return toolbox


def set_fitness(ind, values: tuple, meta: dict, min_clean: float) -> None:
    ind.fitness.values = tuple(float(v) for v in values)
    ind.fitness.violation = max(0.0, min_clean - values[0]) if min_clean > 0 else 0.0
    ind.meta = meta


def evaluate_invalid(individuals: list, toolbox, min_clean: float = 0.0,
                     progress: Optional[Callable] = None, weights: Optional[dict] = None) -> list:
    """Evaluate the individuals without a valid fitness, through ``toolbox.map``.

    Returned model bytes move from ``meta`` into ``weights`` (id -> bytes;
    dropped when None) before anything can copy the individuals.
    """
    from .logbook import take_weights

    invalid = [ind for ind in individuals if not ind.fitness.valid]
    results = toolbox.map(toolbox.evaluate, invalid)
    if progress is not None:
        results = progress(results, len(invalid))
    for ind, (values, meta) in zip(invalid, results):
        set_fitness(ind, values, meta, min_clean)
    take_weights(invalid, weights)
    return invalid


def assign_id(ind, state: SearchState, gen: int, parents: tuple) -> None:
    ind.id, ind.parents, ind.gen = state.next_id, tuple(parents), gen
    state.next_id += 1


def vary(population: list, toolbox, cxpb: float, mutpb: float, state: SearchState, gen: int,
         rng: random.Random = random) -> list:
    """Tournament-DCD selection, cloning, crossover and mutation; returns the new offspring.

    An offspring whose phenotype is already in ``population`` (such as an
    unchanged clone of its parent) or earlier among the offspring is
    dropped: evaluating it would only spend GPU time, and keeping it would
    put one network (or one id) twice into the population.  The rest get a
    fresh id and an invalid fitness.
    """
    parents = tools.selTournamentDCD(population, len(population))
    offspring = [toolbox.clone(ind) for ind in parents]
    lineage = [[ind.id] for ind in offspring]
    for i in range(0, len(offspring) - 1, 2):
        if rng.random() <= cxpb:
            toolbox.mate(offspring[i], offspring[i + 1])
            lineage[i] = lineage[i + 1] = sorted({parents[i].id, parents[i + 1].id})
    for ind in offspring:
        if rng.random() <= mutpb:
            toolbox.mutate(ind)
    seen = {toolbox.phenotype_text(ind) for ind in population}
    new = []
    for ind, ancestry in zip(offspring, lineage):
        text = toolbox.phenotype_text(ind)
        if text not in seen:
            seen.add(text)
            del ind.fitness.values
            assign_id(ind, state, gen, ancestry)
            new.append(ind)
    return new


def initial_population(toolbox, mu: int, state: SearchState, max_draws_per_slot: int = 100) -> list:
    """``mu`` random individuals with distinct phenotypes.

    A duplicate draw is redrawn, up to ``max_draws_per_slot * mu`` draws in
    all; past that (a search space with fewer than ``mu`` networks) draws are
    kept as they come.
    """
    population, seen, draws = [], set(), 0
    while len(population) < mu:
        ind = toolbox.individual()
        draws += 1
        text = toolbox.phenotype_text(ind)
        if text in seen and draws < max_draws_per_slot * mu:
            continue
        seen.add(text)
        assign_id(ind, state, 0, ())
        population.append(ind)
    return population


def nsga2_generation(state: SearchState, toolbox, cxpb: float, mutpb: float, min_clean: float = 0.0,
                     progress: Optional[Callable] = None, rng: random.Random = random) -> list:
    """One (mu + lambda) step; returns the newly evaluated individuals (their weights in ``state.weights``)."""
    gen = state.gen + 1
    offspring = vary(state.population, toolbox, cxpb, mutpb, state, gen, rng)
    evaluated = evaluate_invalid(offspring, toolbox, min_clean, progress, state.weights)
    state.population = toolbox.select(state.population + offspring, len(state.population))
    state.archive.update(evaluated)
    state.gen = gen
    return evaluated


def hypervolume_2d(points: list, ref: tuple = (0.0, 0.0)) -> float:
    """Area dominated by ``points`` (both objectives maximised) above ``ref``."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y and x > ref[0]:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area
