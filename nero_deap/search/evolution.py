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
the initial population repeats phenotypes, each under its own id.  A ``tools.ParetoFront`` archive holds every
non-dominated individual seen (``HallOfFame`` would rank by the first objective only).

The objectives come from :mod:`nero_deap.search.objectives` (clean and FGSM
accuracy by default); :func:`use_objectives` sets the fitness weights of a
run.  With ``min_clean`` (tau) > 0, domination is *constrained*: a feasible
individual (clean >= tau) dominates an infeasible one, and between
infeasible ones the smaller violation wins, mirroring NERO-Net's
clean-accuracy threshold.

Algorithms (:data:`ALGORITHMS`, ``--algorithm``): ``nsga2`` and ``random``,
a baseline that samples fresh genotypes every generation and shares
everything else (evaluation, archive, outputs), so that the two can be
compared at equal budget.

The DEAP ``creator`` classes are created here, at import, so SCOOP workers
(and checkpoint loading) can unpickle individuals.  Their weights are
class-level in DEAP; workers only evaluate, so only the root needs them set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from deap import base, creator, tools

from ..space.genotype import Genotype, init_genotype, to_phenotype
from ..space.operators import mate, mutate


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

    # DEAP's sortNondominated groups individuals by fitness (hash and ==): equal values with different
    # violations must not fall into one group, or a violating individual shares a front with a feasible one
    def __hash__(self):
        return hash((self.wvalues, self.violation))

    def __eq__(self, other):
        return self.wvalues == other.wvalues and self.violation == getattr(other, "violation", 0.0)

    def __ne__(self, other):
        return not self.__eq__(other)


if not hasattr(creator, "FitnessMulti"):
    creator.create("FitnessMulti", ConstrainedFitness, weights=(1.0, 1.0))
    creator.FitnessCleanFgsm = creator.FitnessMulti  # the name in checkpoints written before the registry
if not hasattr(creator, "Individual"):
    creator.create("Individual", Genotype, fitness=creator.FitnessMulti)


def use_objectives(objectives) -> None:
    """Set the fitness weights (+1 maximised, -1 minimised) of this process's individuals."""
    creator.FitnessMulti.weights = tuple(o.weight for o in objectives)


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
    """Register init, mate, mutate, select, evaluate, map and evaluate_offspring (the full budget for every
    new candidate; :func:`nero_deap.search.fidelity.register` swaps in another fidelity)."""
    toolbox = base.Toolbox()
    toolbox.register("individual", init_genotype, grammar, structure, rng, creator.Individual)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    toolbox.register("mate", mate, grammar=grammar, structure=structure, rates=rates, rng=rng)
    toolbox.register("mutate", mutate, grammar=grammar, structure=structure, rates=rates, rng=rng)
    toolbox.register("select", tools.selNSGA2)
    toolbox.register("evaluate", evaluate)
    toolbox.register("evaluate_offspring", evaluate_invalid)
    toolbox.register("map", map_fn)
    toolbox.register("phenotype_text", lambda ind: to_phenotype(ind, grammar, structure).to_text())
    toolbox.register("cost", planned_cost, grammar=grammar, structure=structure)
    return toolbox


def planned_cost(ind, grammar, structure) -> int:
    """An evaluation's relative cost before it runs: its network's forward FLOPs per image (CIFAR-sized
    input), 0 for one that cannot be decoded or built (its evaluation fails fast and says why)."""
    from ..nets.network import planned_flops

    try:
        phenotype = to_phenotype(ind, grammar, structure)
    except Exception:  # noqa: BLE001 - only the order depends on it; the evaluation reports the failure
        return 0
    return planned_flops(phenotype)


def dispatch_order(individuals: list, toolbox) -> list:
    """Indices of ``individuals``, costliest first by ``toolbox.cost`` (in order without one).

    Why: a parallel map hands tasks out in order, so the generation ends when the last worker does; the
    costliest first is the classic longest-processing-time rule, which leaves only short tasks for the end.
    Forward FLOPs ranked training seconds with a Spearman correlation of 0.70 and 0.89 in two GPU searches
    and 0.90 in a CPU one (BENCHMARKS.md, "Dispatch under SCOOP").  On a toy map (``bench/bench_dispatch.py``)
    of 13 and 10 tasks on 4 processes, longest first by the exact durations cut the time past the longest
    task from 1.17 to 0.87 s and 0.91 to 0.61 s: an upper bound for an order by FLOPs; with no more tasks
    than processes there is nothing to reorder.  Evaluations are seeded by their candidate's id, so the
    order changes no result unless ``--max-seconds`` cuts a training short (then what ran beside it on a
    shared device matters); four CPU searches, before and after, wrote identical tables.
    """
    cost = getattr(toolbox, "cost", None)
    if cost is None:
        return list(range(len(individuals)))
    costs = [cost(ind) for ind in individuals]
    return sorted(range(len(individuals)), key=lambda i: -costs[i])


@dataclass(frozen=True)
class Constraint:
    """``values[index] >= tau`` by constrained domination (``--min-clean``); tau 0 = off."""

    index: Optional[int] = None
    tau: float = 0.0

    def violation(self, values: tuple) -> float:
        return max(0.0, self.tau - values[self.index]) if self.tau > 0 and self.index is not None else 0.0


UNDERTRAINED = 2.0  # added to a stopped candidate's violation: above any clean-accuracy violation (<= 1)
FAILED = 2 * UNDERTRAINED  # a failed evaluation (no trained network at all) ranks below a stopped one


def is_complete(ind) -> bool:
    """Whether the candidate's scores come from its full training budget (``--fidelity halving`` stops some
    earlier; see :mod:`nero_deap.search.fidelity`).  Runs from before the option: always."""
    return getattr(ind, "meta", {}).get("fidelity", 1.0) >= 1.0


def set_fitness(ind, values: tuple, meta: dict, constraint: Constraint = Constraint()) -> None:
    """Set values and metadata; the violation makes every fully trained candidate dominate a stopped one,
    and a stopped one dominate a failed one (worst values, no network)."""
    ind.fitness.values = tuple(float(v) for v in values)
    ind.meta = meta
    penalty = FAILED if meta.get("status", "ok") != "ok" else 0.0 if is_complete(ind) else UNDERTRAINED
    ind.fitness.violation = constraint.violation(ind.fitness.values) + penalty


def evaluate_invalid(individuals: list, toolbox, constraint: Constraint = Constraint(),
                     progress: Optional[Callable] = None, weights: Optional[dict] = None) -> list:
    """Evaluate the individuals without a valid fitness, through ``toolbox.map``.

    Returned model bytes move from ``meta`` into ``weights`` (id -> bytes;
    dropped when None) before anything can copy the individuals.
    """
    invalid = [ind for ind in individuals if not ind.fitness.valid]
    return evaluate_mapped(toolbox.evaluate, invalid, (), toolbox, constraint, progress, weights)


def evaluate_mapped(fn: Callable, individuals: list, extra: tuple, toolbox, constraint: Constraint = Constraint(),
                    progress: Optional[Callable] = None, weights: Optional[dict] = None) -> list:
    """``toolbox.map(fn, individuals, *extra)``, costliest first (:func:`dispatch_order`); set each one's
    fitness and meta, move its weights to ``weights``."""
    order = dispatch_order(individuals, toolbox)
    columns = [list(column) for column in extra]
    mapped = toolbox.map(fn, [individuals[i] for i in order], *[[column[i] for i in order] for column in columns])
    if progress is not None:
        mapped = progress(mapped, len(individuals))
    for i, (values, meta) in zip(order, mapped):
        set_fitness(individuals[i], values, meta, constraint)
    take_weights(individuals, weights)
    return individuals


def take_weights(evaluated: list, sink: Optional[dict]) -> None:
    """Move ``meta['weights']`` (the bytes a worker returned) into ``sink[id]``.

    Done as soon as results arrive, before the Pareto archive deep-copies
    individuals, so no copy (archive, clone, checkpoint) ever carries weights.
    """
    for ind in evaluated:
        blob = getattr(ind, "meta", {}).pop("weights", None)
        if blob is not None and sink is not None:
            sink[ind.id] = blob


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


def initial_population(toolbox, mu: int, state: SearchState, max_draws_per_slot: int = 100, gen: int = 0,
                       avoid: tuple = ()) -> list:
    """``mu`` random individuals with distinct phenotypes (none of them among ``avoid``'s), ids of ``gen``.

    A duplicate draw is redrawn, up to ``max_draws_per_slot * mu`` draws in
    all; past that (a search space with fewer than ``mu`` networks) draws are
    kept as they come.
    """
    population, seen, draws = [], {toolbox.phenotype_text(ind) for ind in avoid}, 0
    while len(population) < mu:
        ind = toolbox.individual()
        draws += 1
        text = toolbox.phenotype_text(ind)
        if text in seen and draws < max_draws_per_slot * mu:
            continue
        seen.add(text)
        assign_id(ind, state, gen, ())
        population.append(ind)
    return population


def initial_generation(state: SearchState, toolbox, mu: int, constraint: Constraint = Constraint(),
                       progress: Optional[Callable] = None) -> list:
    """Generation 0: ``mu`` random genotypes, evaluated, audited and archived (selection sets crowding)."""
    state.population = []
    return advance(state, toolbox, initial_population(toolbox, mu, state), 0, constraint, progress)


def archive_entrants(evaluated: list, archive) -> list:
    """The newly evaluated individuals that are non-dominated among themselves and the archive."""
    if not evaluated:
        return []
    front = tools.sortNondominated(list(evaluated) + list(archive), len(evaluated) + len(archive),
                                   first_front_only=True)[0]
    fresh = {id(ind) for ind in evaluated}
    return [ind for ind in front if id(ind) in fresh]


def advance(state: SearchState, toolbox, offspring: list, gen: int, constraint: Constraint,
            progress: Optional[Callable]) -> list:
    """Evaluate ``offspring`` (``toolbox.evaluate_offspring``: :mod:`nero_deap.search.fidelity`), let
    ``toolbox.audit`` (if any) see the fully trained ones, select, update the archive with them."""
    evaluated = toolbox.evaluate_offspring(offspring, toolbox, constraint, progress, state.weights)
    complete = [ind for ind in evaluated if is_complete(ind)]
    if hasattr(toolbox, "audit"):
        toolbox.audit(archive_entrants(complete, state.archive), constraint, state.weights)
    mu = len(state.population) or len(offspring)  # generation 0 starts from an empty population
    state.population = toolbox.select(state.population + offspring, mu)
    state.archive.update(complete)
    state.gen = gen
    return evaluated


def nsga2_generation(state: SearchState, toolbox, cxpb: float, mutpb: float, constraint: Constraint = Constraint(),
                     progress: Optional[Callable] = None, rng: random.Random = random) -> list:
    """One (mu + lambda) step; returns the newly evaluated individuals."""
    gen = state.gen + 1
    offspring = vary(state.population, toolbox, cxpb, mutpb, state, gen, rng)
    return advance(state, toolbox, offspring, gen, constraint, progress)


def random_generation(state: SearchState, toolbox, cxpb: float, mutpb: float, constraint: Constraint = Constraint(),
                      progress: Optional[Callable] = None, rng: random.Random = random) -> list:
    """Random-search baseline: ``mu`` fresh random genotypes, evaluated and archived like NSGA-II's offspring.

    The population is still reduced by NSGA-II's selection, which only
    shapes gens.csv's statistics: sampling never looks at it.
    """
    gen = state.gen + 1
    offspring = initial_population(toolbox, len(state.population), state, gen=gen, avoid=state.population)
    return advance(state, toolbox, offspring, gen, constraint, progress)


ALGORITHMS = {"nsga2": nsga2_generation, "random": random_generation}
