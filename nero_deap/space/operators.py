"""Grammar-aware variation operators with DEAP signatures.

``mutate(ind) -> (ind,)`` and ``mate(a, b) -> (a, b)`` modify in place, as
DEAP's own operators do; bind the grammar, structure and rates with
``toolbox.register("mutate", mutate, grammar=g, structure=s, rates=r)``.
Every offspring is normalised (see :mod:`nero_deap.space.genotype`), hence valid.

Mutation follows Fast-DENSER (defaults in :class:`VariationRates`).  "Reuse"
duplicates an existing layer's genes: a copy, so the two evolve apart later.
Crossover is ours: one-point on a module's layer list, or uniform swap of
DSGE gene lists between aligned layers.
"""
from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass

from .genotype import Genotype, Layer, normalise, random_layer, random_skips
from .grammar import Grammar, Range
from .structure import NetworkStructure


@dataclass
class VariationRates:
    add_layer: float = 0.25
    reuse_layer: float = 0.15
    remove_layer: float = 0.25
    dsge_layer: float = 0.15
    macro_layer: float = 0.3
    add_connection: float = 0.0
    remove_connection: float = 0.0
    grammar_change_share: float = 1 / 3  # grammar vs numeric change, 1:2
    float_sigma: float = 0.15  # Gaussian sigma as a fraction of the range
    one_point_crossover: float = 0.5  # per module; else uniform gene swap
    gene_swap: float = 0.5  # per non-terminal, in the uniform gene swap

    @classmethod
    def from_config(cls, cfg: dict) -> "VariationRates":
        names = set(asdict(cls()))
        unknown = set(cfg or {}) - names
        if unknown:
            raise ValueError(f"unknown [variation] key(s): {', '.join(sorted(unknown))}")
        values = {}
        for key, value in (cfg or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"variation.{key} must be a number, got {value!r}")
            values[key] = float(value)
        rates = cls(**values)
        for name, value in asdict(rates).items():
            if not 0.0 <= value <= (10.0 if name == "float_sigma" else 1.0):
                raise ValueError(f"variation.{name} = {value} must lie in [0, {10 if name == 'float_sigma' else 1}]")
        return rates


# --------------------------------------------------------------- mutation
def dsge_mutation(genes: dict, grammar: Grammar, rates: VariationRates, rng: random.Random) -> bool:
    """Change one gene: its expansion (grammar change) or one numeric value.

    Returns whether anything was changed.  The caller re-normalises.
    """
    choices = []
    for nt, gene_list in genes.items():
        for gene in gene_list:
            can_grammar = len(grammar.rules[nt]) > 1
            if can_grammar or gene.values:
                choices.append((nt, gene, can_grammar))
    if not choices:
        return False
    nt, gene, can_grammar = rng.choice(choices)
    if can_grammar and (not gene.values or rng.random() < rates.grammar_change_share):
        others = [i for i in range(len(grammar.rules[nt])) if i != gene.expansion]
        gene.expansion = rng.choice(others)
        return True
    name = rng.choice(sorted(gene.values))
    symbol = next(s for s in grammar.rules[nt][gene.expansion] if isinstance(s, Range) and s.name == name)
    values = list(gene.values[name])
    i = rng.randrange(len(values))
    if symbol.kind == "int":
        values[i] = rng.randint(int(symbol.low), int(symbol.high))
    else:
        sigma = rates.float_sigma * (symbol.high - symbol.low)
        values[i] = float(min(symbol.high, max(symbol.low, values[i] + rng.gauss(0.0, sigma))))
    gene.values[name] = values
    return True


def mutate(ind: Genotype, grammar: Grammar, structure: NetworkStructure,
           rates: VariationRates = VariationRates(), rng: random.Random = random) -> tuple:
    """Fast-DENSER mutation of every module and of the macro genes."""
    for spec, module in zip(structure.modules, ind.modules):
        layers = module.layers
        for _ in range(rng.randint(1, 2)):
            if len(layers) < spec.max_layers and rng.random() < rates.add_layer:
                if layers and rng.random() < rates.reuse_layer:
                    new = copy.deepcopy(rng.choice(layers))
                else:
                    new = random_layer(grammar, spec.name, structure, rng)
                pos = rng.randint(0, len(layers))
                new.skips = random_skips(pos, spec.levels_back, rng) if spec.levels_back > 1 else []
                layers.insert(pos, new)
        for _ in range(rng.randint(1, 2)):
            if len(layers) > spec.min_layers and rng.random() < rates.remove_layer:
                del layers[rng.randrange(len(layers))]
        for pos, layer in enumerate(layers):
            if rng.random() < rates.dsge_layer:
                dsge_mutation(layer.genes, grammar, rates, rng)
            _mutate_connections(layer, pos, spec.levels_back, rates, rng)
    for nt in structure.macro:
        if rng.random() < rates.macro_layer:
            dsge_mutation(ind.macro[nt], grammar, rates, rng)
    normalise(ind, grammar, structure, rng)
    return (ind,)


def _mutate_connections(layer: Layer, pos: int, levels_back: int, rates: VariationRates,
                        rng: random.Random) -> None:
    if rates.add_connection and rng.random() < rates.add_connection:
        free = [k for k in range(2, levels_back + 1) if pos - k >= -1 and k not in layer.skips]
        if free:
            layer.skips = sorted(layer.skips + [rng.choice(free)])
    if rates.remove_connection and layer.skips and rng.random() < rates.remove_connection:
        dropped = rng.choice(layer.skips)
        layer.skips = [k for k in layer.skips if k != dropped]


# -------------------------------------------------------------- crossover
def one_point_layers(a: list, b: list, min_layers: int, max_layers: int, rng: random.Random) -> tuple:
    """Swap tails at cut points that keep both children within [min, max] layers."""
    cuts = [(i, j) for i in range(len(a) + 1) for j in range(len(b) + 1)
            if min_layers <= i + len(b) - j <= max_layers and min_layers <= j + len(a) - i <= max_layers]
    i, j = rng.choice(cuts)  # never empty: (0, 0) swaps whole lists
    return a[:i] + b[j:], b[:j] + a[i:]


def swap_genes(x: dict, y: dict, rng: random.Random, p: float) -> None:
    """Uniform crossover of whole per-non-terminal gene lists."""
    for nt in sorted(set(x) & set(y)):
        if rng.random() < p:
            x[nt], y[nt] = y[nt], x[nt]


def mate(a: Genotype, b: Genotype, grammar: Grammar, structure: NetworkStructure,
         rates: VariationRates = VariationRates(), rng: random.Random = random) -> tuple:
    """Per module: one-point layer crossover, or uniform DSGE gene swap."""
    for spec, ma, mb in zip(structure.modules, a.modules, b.modules):
        if rng.random() < rates.one_point_crossover:
            ma.layers, mb.layers = one_point_layers(ma.layers, mb.layers, spec.min_layers, spec.max_layers, rng)
        else:
            for la, lb in zip(ma.layers, mb.layers):
                swap_genes(la.genes, lb.genes, rng, rates.gene_swap)
    for nt in structure.macro:
        swap_genes(a.macro[nt], b.macro[nt], rng, rates.gene_swap)
    normalise(a, grammar, structure, rng)
    normalise(b, grammar, structure, rng)
    return a, b


__all__ = ["VariationRates", "mutate", "mate", "dsge_mutation", "one_point_layers", "swap_genes"]
