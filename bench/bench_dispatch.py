"""How SCOOP hands out a generation's evaluations: time past the longest task, per round of a toy map.

    python -m scoop -n 4 bench/bench_dispatch.py --tasks 4                  # as run.py patches scoop
    python -m scoop -n 4 bench/bench_dispatch.py --tasks 13 --longest-first # and costliest first
    python -m scoop -n 4 bench/bench_dispatch.py --tasks 4 --scoop-dispatch # scoop's own dispatch

Each round maps ``--tasks`` tasks that sleep 0.2, 0.4, 0.8 or 1.6 s (drawn with a fixed seed) and prints
the round's wall clock, its longest task, how many processes ran tasks and how many tasks ran on a
process that had already run one that round.  The mean time past the longest task is what dispatch
costs (the ideal is the longest task, or the total over the processes when that is longer).  The
search's own order is :func:`nero_deap.search.evolution.dispatch_order`; ``--longest-first`` sorts the sleeps
the same way.  A benchmark, not a test (tests/test_gpu_ready.py has the check).
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nero_deap.search.parallel as parallel  # noqa: E402

SCOOP_DISPATCH = "--scoop-dispatch" in sys.argv  # read before the patch: every process runs this module
if SCOOP_DISPATCH:
    parallel._patch_dispatch = lambda: None
parallel.patch_scoop()

from scoop import futures  # noqa: E402


def task(seconds: float) -> tuple:
    time.sleep(seconds)
    return os.getpid()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=7)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--longest-first", action="store_true")
    p.add_argument("--scoop-dispatch", action="store_true", help="leave scoop's dispatch as it is")
    args = p.parse_args()
    rng, excess = random.Random(0), []
    list(futures.map(task, [0.2] * args.tasks))  # every worker up and asking before the rounds that count
    for i in range(args.rounds):
        sleeps = [rng.choice([0.2, 0.4, 0.8, 1.6]) for _ in range(args.tasks)]
        if args.longest_first:
            sleeps.sort(reverse=True)
        start = time.perf_counter()
        pids = list(futures.map(task, sleeps))
        wall = time.perf_counter() - start
        excess.append(wall - max(sleeps))
        print(f"round {i}: {args.tasks} tasks, wall {wall:.2f} s, longest {max(sleeps):.2f} s, "
              f"{len(set(pids))} processes, {len(pids) - len(set(pids))} after another on its process")
    print(f"mean time past the longest task: {sum(excess) / len(excess):.3f} s "
          f"({'scoop' if args.scoop_dispatch else 'patched'} dispatch"
          f"{', longest first' if args.longest_first else ''})")


if __name__ == "__main__":
    main()
