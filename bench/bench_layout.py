"""Float32 CPU training speed by memory layout: NCHW (the default) vs channels_last on weights and batches.

    python bench/bench_layout.py [--data PATH/cifar10-jpeg.zip] [--train-subset 2000] [--repeats 3]

Trains the engine benchmark's reference network for one epoch per run,
alternating the two layouts, and prints images/s.  Both layouts keep weights
and batches in the same format (issue #13: a mismatch crashed oneDNN).  A
benchmark, not a test.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import REFERENCE  # noqa: E402
from nero_deap.engine.datasets import load_raw  # noqa: E402
from nero_deap.engine.data import make_splits
from nero_deap.nets.network import build_network  # noqa: E402
from nero_deap.space.phenotype import Phenotype  # noqa: E402
from nero_deap.engine.train import TrainSettings, train  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("NERO_DEAP_CIFAR10_ZIP", "cifar10"),
                   help="a --data spec (default $NERO_DEAP_CIFAR10_ZIP, else cifar10)")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    splits = make_splits(load_raw(a.data), train_subset=a.train_subset)
    phenotype = Phenotype.from_text(REFERENCE)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {len(splits.train_y)} images x 1 epoch")
    for rep in range(a.repeats):
        for name, layout in LAYOUTS.items():
            torch.manual_seed(0)
            model = build_network(phenotype, mean=splits.mean, std=splits.std).use_memory_format(layout)
            start = time.perf_counter()
            train(model, phenotype.learning, splits.train_x, splits.train_y,
                  TrainSettings(epochs=1, seed=0, accelerate=False))
            print(f"run {rep}  {name:>13}: {len(splits.train_y) / (time.perf_counter() - start):.0f} images/s",
                  flush=True)


if __name__ == "__main__":
    main()
