import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NERO_DEAP_CACHE", str(ROOT / "runs" / ".test-cache"))

TINY_GRAMMAR = ROOT / "tests" / "tiny.grammar"
# The real CIFAR-10 (all of it as JPEGs in a zip): the tests that need it skip, saying so, when
# $NERO_DEAP_CIFAR10_ZIP does not name it.
CIFAR_ZIP = Path(os.environ.get("NERO_DEAP_CIFAR10_ZIP") or "/nonexistent/cifar10-jpeg.zip")


@pytest.fixture
def tiny_grammar_path():
    return TINY_GRAMMAR


def dense_in(x, memory_format) -> bool:
    """Strides exactly those of ``memory_format`` (is_contiguous alone is lenient on size-1 dims)."""
    import torch

    return x.stride() == torch.empty(x.shape).contiguous(memory_format=memory_format).stride()


def random_phenotypes(n: int, seed: int) -> list:
    """``n`` random phenotypes of each shipped grammar (cnn.grammar, then fast-denser-cifar10.grammar), as
    generation 0 of a search draws them."""
    import random

    from nero_deap.space.genotype import init_genotype, to_phenotype
    from nero_deap.space.grammar import Grammar
    from nero_deap.space.structure import NetworkStructure

    phenotypes = []
    for name in ("cnn.grammar", "fast-denser-cifar10.grammar"):
        g, s, rng = Grammar.from_file(ROOT / "grammars" / name), NetworkStructure(), random.Random(seed)
        phenotypes += [to_phenotype(init_genotype(g, s, rng), g, s) for _ in range(n)]
    return phenotypes


def without_timing(frame):
    """A run's CSV without the columns that differ between two identical runs (seconds, rates)."""
    from nero_deap.store.logbook import TIMING_COLUMNS

    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame.columns])


def run_cli(args, *, scoop=False, check=True, **kw):
    """``python [-m scoop -n 2] run.py ARGS`` from the repository root; asserts success unless ``check`` is off."""
    cmd = [sys.executable] + (["-m", "scoop", "-n", "2"] if scoop else []) + [str(ROOT / "run.py")] + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def resume_run(run_dir, generations: int) -> subprocess.CompletedProcess:
    """``run.py --resume RUN --generations N`` on one thread, as a user would continue an old run."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "--resume", str(run_dir), "--generations",
                           str(generations), "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
