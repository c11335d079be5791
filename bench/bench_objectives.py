"""What the robustness objectives and the masking audit cost, as a fraction of training time.

    python bench/bench_objectives.py [--data PATH/cifar10-jpeg.zip] [--train-subset 4000]
                                     [--val-size 1000] [--epochs 3] [--accelerate on] [--objectives fgsm,pgd5,pgd10]

Trains the engine benchmark's reference network as one search candidate
(the budget of ``configs/cpu-bf16.toml`` by default), then times each
objective's measurement on the validation split and the audit (margin-loss
PGD-20), and prints each as a fraction of that candidate's training time.
The search audits only the individuals entering the Pareto archive, so the
audit's share of a generation is this fraction times the share of entrants
(the ``front_size`` growth in gens.csv).  A benchmark, not a test.
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
from nero_deap.search import objectives as objs  # noqa: E402
from nero_deap.store.config import ACCELERATE  # noqa: E402
from nero_deap.engine.datasets import load_raw  # noqa: E402
from nero_deap.engine.data import make_splits
from nero_deap.nets.network import build_network  # noqa: E402
from nero_deap.space.phenotype import Phenotype  # noqa: E402
from nero_deap.engine.train import TrainSettings, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("NERO_DEAP_CIFAR10_ZIP", "cifar10"),
                   help="a --data spec (default $NERO_DEAP_CIFAR10_ZIP, else cifar10)")
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--accelerate", choices=list(ACCELERATE), default="on")
    p.add_argument("--objectives", default="clean,fgsm,pgd5,pgd10", help="measured one by one, in this order")
    p.add_argument("--audit", default=objs.DEFAULT_AUDIT)
    a = p.parse_args()
    splits = make_splits(load_raw(a.data), a.val_size, 0, a.train_subset or None)
    phenotype = Phenotype.from_text(REFERENCE)
    torch.manual_seed(0)
    model = build_network(phenotype, splits.num_classes, splits.image_shape, splits.mean, splits.std)
    start = time.perf_counter()
    train(model, phenotype.learning, splits.train_x, splits.train_y,
          TrainSettings(epochs=a.epochs, seed=0, accelerate=ACCELERATE[a.accelerate]))
    train_s = time.perf_counter() - start
    print(f"device cpu, torch {torch.__version__}, {torch.get_num_threads()} threads; train "
          f"{len(splits.train_y)} x {a.epochs:g} epochs (accelerate {a.accelerate}): {train_s:.1f} s; "
          f"validation {len(splits.val_y)} images")
    print("| measurement | seconds | fraction of training | value |\n|---|---|---|---|")
    m = objs.Measure(splits.val_x, splits.val_y, 8 / 255, 500, seed=0)
    for name in a.objectives.split(",") + [f"audit:{a.audit}"]:
        objective = objs.get(name.split(":")[-1])
        start = time.perf_counter()
        value = objective.measure(model, m, {})  # a fresh cache: clean and fgsm each pay their pass here
        seconds = time.perf_counter() - start
        print(f"| {name} | {seconds:.2f} | {seconds / train_s:.3f} | {value:.3f} |")


if __name__ == "__main__":
    main()
