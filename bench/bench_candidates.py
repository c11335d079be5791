"""Where training time goes in the networks a search actually trains, not only in the reference network.

    python bench/bench_candidates.py [--grammar grammars/cnn.grammar] [--n 25] [--seed 3] [--accelerate on]

Samples ``--n`` random phenotypes of the grammar (as generation 0 of a
search does), trains each for a few steps on synthetic images (speed does
not depend on the pixels) with the engine, after one warm-up run, and
prints per candidate: images/s, its forward MFLOPs per image, the FLOP/s
that makes, the three operators with the most self time (torch.profiler),
and which of the engine's speed choices it got (the C kernels that ran,
BatchNorm run in NCHW where they are unavailable, ReLU moved behind
max-pooling or into BatchNorm, BatchNorm handed to its max-pool).
Operators that top many cheap candidates are where a generic fix pays: this
survey found CPU dropout's random numbers and a layout bug in global pooling
(issue #12, BENCHMARKS.md).  A benchmark, not a test.
"""
import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nero_deap.cli import add_accelerate_option  # noqa: E402
from nero_deap.store.config import ACCELERATE  # noqa: E402
from nero_deap.engine.datasets import load_raw  # noqa: E402
from nero_deap.engine.data import make_splits
from nero_deap.space.genotype import init_genotype, to_phenotype  # noqa: E402
from nero_deap.space.grammar import Grammar  # noqa: E402
from nero_deap.engine.memory import keep_freed_memory  # noqa: E402
from nero_deap.nets import native  # noqa: E402
from nero_deap.nets.layers import BatchNorm2d, channels_last_batch_norm_is_slow  # noqa: E402
from nero_deap.nets.network import batch_norms_in_pools, build_network, fused_relus, pooled_relus  # noqa: E402
from nero_deap.space.structure import NetworkStructure  # noqa: E402
from nero_deap.engine.train import TrainSettings, batch_size_of, train  # noqa: E402


def rewrites(model, fast: bool, ran: set) -> str:
    """Which of the engine's layer choices apply to ``model`` (to tell changed candidates from drift): the C
    kernels that ran (``ran``: their autograd functions' names in the profile; BatchNorm on the float32 image
    or padded pooling run torch's); where the kernels are unavailable, with ``fast`` (bf16 channels_last),
    BatchNorm layers that change to NCHW on slow channel counts (counted by channel count, so one on 1 x 1
    maps counts too); ReLUs moved behind a max-pool or given to a BatchNorm in any precision."""
    tags = [("C: " + ", ".join(sorted(name.removeprefix("_Native") for name in ran)), 1)] if ran else []
    if fast and native.library() is None:
        tags.append(("BatchNorm in NCHW", sum(isinstance(m, BatchNorm2d) and channels_last_batch_norm_is_slow(
            m.num_features) for m in model.modules())))
    tags += [("ReLU behind max-pool", pooled_relus(model)), ("ReLU in BatchNorm", fused_relus(model)),
             ("BatchNorm in max-pool", batch_norms_in_pools(model))]
    return "".join(f"  [{name}" + (f" x{count}]" if not name.startswith("C: ") else "]") for name, count in tags
                   if count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grammar", default="grammars/cnn.grammar")
    p.add_argument("--n", type=int, default=25, help="how many random candidates")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps timed per candidate")
    add_accelerate_option(p, default="on")
    args = p.parse_args()
    keep_freed_memory()
    fast = bool(ACCELERATE[args.accelerate])
    grammar, structure, rng = Grammar.from_file(args.grammar), NetworkStructure(), random.Random(args.seed)
    splits = make_splits(load_raw("synthetic:1200"))
    print(f"{args.grammar}, seed {args.seed}, accelerate {args.accelerate}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    speeds, tops = [], collections.Counter()
    for i in range(args.n):
        phenotype = to_phenotype(init_genotype(grammar, structure, rng), grammar, structure)
        torch.manual_seed(0)
        model = build_network(phenotype, 10, splits.image_shape, splits.mean, splits.std)
        n = args.steps * batch_size_of(phenotype.learning, len(splits.train_y), 1 << 30)
        x, y = splits.train_x[:n], splits.train_y[:n]
        settings = TrainSettings(epochs=1, accelerate=fast)
        train(model, phenotype.learning, x, y, settings)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            train(model, phenotype.learning, x, y, settings)
            seconds = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        top = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}" for e in events[:3])
        tops[events[0].key] += 1
        ran = {e.key for e in events if e.key.startswith("_Native") and not e.key.endswith("Backward")}
        speeds.append(len(y) / seconds)
        print(f"{i:3d} {speeds[-1]:8.0f} images/s {model.flops / 1e6:8.1f} MFLOP "
              f"{3 * model.flops * speeds[-1] / 1e9:6.0f} GFLOP/s  {top}{rewrites(model, fast, ran)}", flush=True)
    print(f"median {statistics.median(speeds):.0f} images/s; top operator: "
          + ", ".join(f"{k.removeprefix('aten::')} x{v}" for k, v in tops.most_common()))


if __name__ == "__main__":
    main()
