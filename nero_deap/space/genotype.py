"""The two-level genotype and its DSGE mapping to a :class:`Phenotype`.

Outer level: per module an ordered list of :class:`Layer`.  A layer always
takes the previous layer (the module's input for the first one) and may take
extra inputs ``skips``: offsets ``k >= 2`` meaning "the layer k places back"
(``-1``, the module input, included), bounded by the module's levels back.
Offsets, unlike absolute indices, stay meaningful when layers are inserted
or removed, so structural operators only have to drop the ones that fall
off the front.

Inner level: per layer, DSGE genes ``{non-terminal: [Gene, ...]}``, one gene
per use of that non-terminal in the derivation, in use order.  A gene is the
chosen alternative's index plus the values of that alternative's ranges.

:func:`map_genes` is the DSGE mapping.  Given an ``rng`` it also repairs:
it grows genes a new expansion needs, resamples values that no longer fit,
re-picks expansions that break the depth limit and drops unused genes, so
every stored genotype is *normalised*: mapping it again changes nothing.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Optional

from .grammar import Grammar, NonTerminal, Range, Terminal
from .phenotype import Phenotype, parse_value
from .structure import NetworkStructure


@dataclass
class Gene:
    expansion: int
    values: dict = field(default_factory=dict)  # range name -> list of numbers


@dataclass
class Layer:
    genes: dict  # non-terminal -> list[Gene]
    skips: list = field(default_factory=list)  # extra-input offsets (>= 2)


@dataclass
class Module:
    name: str
    layers: list


class Genotype:
    """A whole network: modules of layers, the output layer and macro genes.

    Plain and picklable, so it can be the base of a DEAP ``creator`` class.
    ``id`` and ``parents`` are bookkeeping for logbooks.
    """

    def __init__(self, modules: list, output: dict, macro: dict, id: int = -1, parents: tuple = ()):
        self.modules = modules
        self.output = output
        self.macro = macro
        self.id = id
        self.parents = tuple(parents)

    def __eq__(self, other) -> bool:  # structural, ignores bookkeeping and fitness
        return isinstance(other, Genotype) and (self.modules, self.output, self.macro) == (
            other.modules, other.output, other.macro)

    __hash__ = None

    def __repr__(self) -> str:
        sizes = ",".join(f"{m.name}:{len(m.layers)}" for m in self.modules)
        return f"{type(self).__name__}(id={self.id}, {sizes})"


class MappingError(ValueError):
    """A genotype is not normalised and no rng was given to repair it."""


# ---------------------------------------------------------------- DSGE core
def map_genes(grammar: Grammar, start: str, genes: dict, max_depth: int,
              rng: Optional[random.Random] = None) -> tuple:
    """Map one derivation; return ``(tokens, normalised_genes)``.

    ``tokens`` is a list of ``(key, value)`` pairs in derivation order.
    Without ``rng`` any needed repair raises :class:`MappingError`.
    """
    used: dict = {}
    counters: dict = {}
    tokens: list = []

    def need_rng(what: str):
        if rng is None:
            raise MappingError(f"genotype needs repair ({what}) but no rng was given")
        return rng

    def expand(nt: str, depth_left: int) -> None:
        index = counters.get(nt, 0)
        counters[nt] = index + 1
        slots = used.setdefault(nt, [])
        slots.append(None)
        old = genes.get(nt, [])
        allowed = grammar.alternatives_within(nt, depth_left)
        if index < len(old):
            gene = Gene(old[index].expansion, dict(old[index].values))
            if gene.expansion not in allowed:
                gene.expansion = need_rng(f"<{nt}> expansion {gene.expansion} not allowed").choice(allowed)
        else:
            gene = Gene(need_rng(f"grow <{nt}>").choice(allowed), {})
        values = {}
        for symbol in grammar.rules[nt][gene.expansion]:
            if isinstance(symbol, NonTerminal):
                expand(symbol.name, depth_left - 1)
            elif isinstance(symbol, Range):
                current = gene.values.get(symbol.name)
                if current is None or not symbol.contains(current):
                    current = symbol.sample(need_rng(f"values of {symbol.name}"))
                values[symbol.name] = current
                tokens.append((symbol.name, current[0] if symbol.count == 1 else list(current)))
            else:
                tokens.append(_terminal_pair(symbol))
        slots[index] = Gene(gene.expansion, values)

    expand(start, max_depth)
    if rng is None and used != genes:
        raise MappingError("genotype has unused or changed genes")
    return tokens, used


def _terminal_pair(symbol: Terminal) -> tuple:
    if ":" in symbol.text:
        key, value = symbol.text.split(":", 1)
        return key, parse_value(value)
    return symbol.text, True


def random_genes(grammar: Grammar, start: str, max_depth: int, rng: random.Random) -> dict:
    return map_genes(grammar, start, {}, max_depth, rng)[1]


def tokens_to_dict(tokens: list) -> dict:
    return {key: value for key, value in tokens}


# --------------------------------------------------------------- outer level
def valid_skips(skips: list, position: int, levels_back: int) -> list:
    """Keep offsets that point at an existing earlier layer within levels back."""
    return sorted({k for k in skips if 2 <= k <= levels_back and position - k >= -1})


def random_layer(grammar: Grammar, nt: str, structure: NetworkStructure, rng: random.Random) -> Layer:
    return Layer(random_genes(grammar, nt, structure.max_depth, rng))


def random_skips(position: int, levels_back: int, rng: random.Random) -> list:
    return [k for k in range(2, levels_back + 1) if position - k >= -1 and rng.random() < 0.5]


def init_genotype(grammar: Grammar, structure: NetworkStructure, rng: random.Random,
                  cls: type = Genotype) -> Genotype:
    """A random individual; ``cls`` may be a DEAP ``creator`` subclass."""
    modules = []
    for spec in structure.modules:
        layers = [random_layer(grammar, spec.name, structure, rng) for _ in range(rng.choice(spec.init_layers))]
        for pos, layer in enumerate(layers):
            layer.skips = random_skips(pos, spec.levels_back, rng)
        modules.append(Module(spec.name, layers))
    output = random_genes(grammar, structure.output, structure.max_depth, rng)
    macro = {nt: random_genes(grammar, nt, structure.max_depth, rng) for nt in structure.macro}
    return cls(modules, output, macro)


def normalise(ind: Genotype, grammar: Grammar, structure: NetworkStructure, rng: random.Random) -> Genotype:
    """Repair in place after variation: genes re-mapped, skips filtered."""
    for spec, module in zip(structure.modules, ind.modules):
        for pos, layer in enumerate(module.layers):
            layer.genes = map_genes(grammar, spec.name, layer.genes, structure.max_depth, rng)[1]
            layer.skips = valid_skips(layer.skips, pos, spec.levels_back)
    ind.output = map_genes(grammar, structure.output, ind.output, structure.max_depth, rng)[1]
    ind.macro = {nt: map_genes(grammar, nt, ind.macro.get(nt, {}), structure.max_depth, rng)[1]
                 for nt in structure.macro}
    return ind


def to_phenotype(ind: Genotype, grammar: Grammar, structure: NetworkStructure) -> Phenotype:
    """Map a normalised genotype; raises :class:`MappingError` if it is not."""
    layers: list = []
    module_input = -1
    for spec, module in zip(structure.modules, ind.modules):
        offset = len(layers)
        for pos, layer in enumerate(module.layers):
            tokens, _ = map_genes(grammar, spec.name, layer.genes, structure.max_depth)
            d = tokens_to_dict(tokens)
            local = [pos - 1] + [pos - k for k in layer.skips]
            d["input"] = [module_input if i == -1 else offset + i for i in local]
            layers.append(d)
        module_input = len(layers) - 1
    out = tokens_to_dict(map_genes(grammar, structure.output, ind.output, structure.max_depth)[0])
    out["input"] = [len(layers) - 1]
    layers.append(out)
    learning: dict = {}
    for nt in structure.macro:
        learning.update(tokens_to_dict(map_genes(grammar, nt, ind.macro[nt], structure.max_depth)[0]))
    return Phenotype(layers, learning)


def check_valid(ind: Genotype, grammar: Grammar, structure: NetworkStructure) -> None:
    """Raise ``ValueError`` describing the first way ``ind`` is invalid."""
    if [m.name for m in ind.modules] != [s.name for s in structure.modules]:
        raise ValueError("modules do not match the structure")
    for spec, module in zip(structure.modules, ind.modules):
        if not spec.min_layers <= len(module.layers) <= spec.max_layers:
            raise ValueError(f"module {spec.name} has {len(module.layers)} layers, "
                             f"outside [{spec.min_layers}, {spec.max_layers}]")
        for pos, layer in enumerate(module.layers):
            if layer.skips != valid_skips(layer.skips, pos, spec.levels_back):
                raise ValueError(f"module {spec.name} layer {pos}: bad skips {layer.skips}")
    phenotype = to_phenotype(ind, grammar, structure)  # raises MappingError on inconsistent genes
    for i, layer in enumerate(phenotype.layers):
        if not layer["input"] or any(not -1 <= j < i for j in layer["input"]):
            raise ValueError(f"layer {i} has inputs {layer['input']} (must be earlier layers)")


def clone(ind: Genotype) -> Genotype:
    return copy.deepcopy(ind)
