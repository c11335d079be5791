"""Property tests: random init/mutate/mate/map/round-trip never yields an invalid individual."""
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nero_deap.space.genotype import MappingError, check_valid, init_genotype, map_genes, to_phenotype
from nero_deap.space.grammar import Grammar
from nero_deap.space.operators import VariationRates, mate, mutate, one_point_layers
from nero_deap.space.phenotype import Phenotype, format_value, parse_value
from nero_deap.space.structure import ModuleSpec, NetworkStructure

ROOT = Path(__file__).resolve().parent.parent
GRAMMARS = [ROOT / "grammars" / "cnn.grammar", ROOT / "grammars" / "fast-denser-cifar10.grammar",
            ROOT / "tests" / "tiny.grammar"]
RECURSIVE = Grammar.from_text("""
<features> ::= <block> | layer:conv num-filters:8
<block> ::= <block> <block> | layer:pool-max [k,int,2,1,3] | <act>
<act> ::= act:relu | act:elu
<classification> ::= layer:fc [num-units,int,1,4,8]
<softmax> ::= layer:fc num-units:10
<learning> ::= [lr,float,1,0.001,0.1] | lr:0.01 <more>
<more> ::= momentum:0.9 | <more> nesterov:True
""")
# Wide rates exercise every operator, connections included.
BUSY = VariationRates(add_layer=0.6, reuse_layer=0.5, remove_layer=0.5, dsge_layer=0.6, macro_layer=0.6,
                      add_connection=0.5, remove_connection=0.3)


def spaces():
    out = []
    for path in GRAMMARS:
        out.append((Grammar.from_file(path), NetworkStructure()))
    skip = NetworkStructure(modules=[ModuleSpec("features", 2, 8, [2, 5], 4),
                                     ModuleSpec("classification", 1, 3, [1, 2], 2)], max_depth=4)
    out.append((Grammar.from_file(GRAMMARS[0]), skip))
    out.append((RECURSIVE, skip))
    return out


SPACES = spaces()


def roundtrip(ind, g, s):
    p = to_phenotype(ind, g, s)
    assert Phenotype.from_text(p.to_text()) == p
    assert Phenotype.from_text(p.to_text()).to_text() == p.to_text()
    return p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space=st.integers(0, len(SPACES) - 1), seed=st.integers(0, 2**32 - 1))
def test_random_variation_chains_stay_valid(space, seed):
    g, s = SPACES[space]
    rng = random.Random(seed)
    pop = [init_genotype(g, s, rng) for _ in range(4)]
    for _ in range(15):  # 60 examples x 15 steps x 4 individuals: thousands of steps
        a, b = rng.sample(pop, 2)
        mate(a, b, g, s, BUSY, rng)
        for ind in pop:
            mutate(ind, g, s, BUSY, rng)
            check_valid(ind, g, s)
            p = roundtrip(ind, g, s)
            assert len(p.layers) == sum(len(m.layers) for m in ind.modules) + 1


def test_same_seed_same_individuals():
    g, s = SPACES[0]

    def run(seed):
        rng = random.Random(seed)
        pop = [init_genotype(g, s, rng) for _ in range(6)]
        for _ in range(20):
            mate(pop[0], pop[1], g, s, rng=rng)
            for ind in pop:
                mutate(ind, g, s, rng=rng)
        return [to_phenotype(ind, g, s).to_text() for ind in pop]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_mapping_grows_genes_on_demand_and_trims_unused():
    g = Grammar.from_text("<a> ::= x:1 | <b> <b>\n<b> ::= [v,int,1,0,9]\n")
    genes = {"a": [map_genes(g, "a", {}, 5, random.Random(1))[1]["a"][0]]}
    genes["a"][0].expansion = 1  # switch to an expansion that needs two <b> genes it lacks
    with pytest.raises(MappingError):
        map_genes(g, "a", genes, 5)
    tokens, grown = map_genes(g, "a", genes, 5, random.Random(0))
    assert len(grown["b"]) == 2 and [k for k, _ in tokens] == ["v", "v"]
    grown["a"][0].expansion = 0
    _, trimmed = map_genes(g, "a", grown, 5, random.Random(0))
    assert "b" not in trimmed


def test_float_mutation_is_clipped_and_int_resampled_in_range():
    g = Grammar.from_text("<features> ::= [f,float,1,0,1] [i,int,1,3,5]\n<classification> ::= u:1\n"
                          "<softmax> ::= o:1\n<learning> ::= lr:0.1\n")
    s = NetworkStructure()
    rng = random.Random(3)
    ind = init_genotype(g, s, rng)
    rates = VariationRates(dsge_layer=1.0, float_sigma=5.0)  # huge noise must still be clipped
    for _ in range(200):
        mutate(ind, g, s, rates, rng)
        for layer in ind.modules[0].layers:
            gene = layer.genes["features"][0]
            assert 0.0 <= gene.values["f"][0] <= 1.0 and 3 <= gene.values["i"][0] <= 5


def test_one_point_respects_bounds():
    rng = random.Random(0)
    for _ in range(500):
        a = list(range(rng.randint(1, 6)))
        b = list(range(10, 10 + rng.randint(1, 6)))
        c, d = one_point_layers(a, b, 1, 6, rng)
        assert 1 <= len(c) <= 6 and 1 <= len(d) <= 6 and sorted(c + d) == sorted(a + b)


@pytest.mark.parametrize("value", [True, False, 3, -1, 0.1, 1e-05, 2.0, "same", [1, 2], [0.5, 3]])
def test_value_text_roundtrip(value):
    assert parse_value(format_value(value)) == value
