"""Offspring per second: clone + mutate + map to phenotype, on a grammar.

    python bench/bench_operators.py [--grammar grammars/cnn.grammar] [--seconds 5]

A benchmark, not a test: it prints a rate and asserts nothing.
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nero_deap.space.genotype import clone, init_genotype, to_phenotype  # noqa: E402
from nero_deap.space.grammar import Grammar  # noqa: E402
from nero_deap.space.operators import mate, mutate  # noqa: E402
from nero_deap.space.structure import NetworkStructure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grammar", default="grammars/cnn.grammar")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grammar, structure = Grammar.from_file(args.grammar), NetworkStructure()
    rng = random.Random(args.seed)
    pop = [init_genotype(grammar, structure, rng) for _ in range(32)]
    count, mates, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        child = clone(rng.choice(pop))
        mutate(child, grammar, structure, rng=rng)
        to_phenotype(child, grammar, structure)
        pop[rng.randrange(len(pop))] = child
        count += 1
        if count % 10 == 0:
            a, b = clone(rng.choice(pop)), clone(rng.choice(pop))
            mate(a, b, grammar, structure, rng=rng)
            mates += 1
    elapsed = time.perf_counter() - start
    print(f"grammar={args.grammar} offspring/s (clone+mutate+map) = {count / elapsed:.0f}  "
          f"[{count} offspring, {mates} crossovers, {elapsed:.1f} s]")


if __name__ == "__main__":
    main()
