"""Per-candidate speed ratios between bench_candidates.py runs with and without the C kernels.

    python bench/compare_candidates.py OUTPUT.txt

OUTPUT.txt holds, for each grammar, a run with ``NERO_DEAP_NATIVE=1`` and one with ``=0``, each headed by a
``# <commit> <time> NERO_DEAP_NATIVE=<k> python bench/bench_candidates.py --grammar grammars/<g>.grammar`` line
(the loop in BENCHMARKS.md writes it so).  Prints, per grammar, the geometric mean of images/s with over
without for the candidates in which a C kernel ran (tagged ``[C: ...]``) and for the others (the VM's drift).
"""
import math
import re
import statistics
import sys


def runs(text: str) -> dict:
    """{(grammar, native flag): {candidate: (images/s, whether a C kernel ran)}}."""
    out = {}
    for run in re.split(r"^# ", text, flags=re.M)[1:]:
        head = run.splitlines()[0]
        key = (re.search(r"grammars/(\S+)\.grammar", head).group(1), re.search(r"NERO_DEAP_NATIVE=(\d)", head).group(1))
        out[key] = {int(m.group(1)): (int(m.group(2)), "[C:" in line) for line in run.splitlines()[1:]
                    for m in [re.match(r"\s*(\d+)\s+(\d+) images/s", line)] if m}
    return out


def geometric_mean(values: list) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main() -> None:
    data = runs(open(sys.argv[1]).read())
    for grammar in sorted({g for g, _ in data}):
        on, off = data.get((grammar, "1"), {}), data.get((grammar, "0"), {})
        both = [i for i in on if i in off]
        ran = [on[i][0] / off[i][0] for i in both if on[i][1]]
        rest = [on[i][0] / off[i][0] for i in both if not on[i][1]]
        print(f"{grammar}: {len(ran)} candidates ran a C kernel: {geometric_mean(ran):.2f}x "
              f"({min(ran, default=float('nan')):.2f}-{max(ran, default=float('nan')):.2f}); the other "
              f"{len(rest)}: {geometric_mean(rest):.2f}x; median images/s "
              f"{statistics.median(v[0] for v in on.values()):.0f} with, "
              f"{statistics.median(v[0] for v in off.values()):.0f} without")


if __name__ == "__main__":
    main()
