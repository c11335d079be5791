"""Issue #12's comparison at equal wall-clock: python experiments/summarize_fidelity.py runs/fidelity [--per-seed]

Every run is cut at the same budget T, the largest wall-clock time every run reached (the sum of
gens.csv's wall_s, generation by generation): each run counts the generations it finished within T.
With ``--per-seed`` each seed's pair (``full-sN``, ``halving-sN``) is cut at its own T, the shorter of the
two totals: the budget the experiment gave that pair (a seed whose networks are slow to train is not cut
to a faster seed's budget).
Per run, at T: hypervolume, the best clean and best robust accuracy on the front, the number of fully
trained candidates and of all evaluations.  The front at T is recomputed from individuals.csv: the
fully trained, successful candidates of those generations that no other dominates (constrained by
min_clean as the search was).
"""
import sys
import tomllib
from pathlib import Path

import moocore
import pandas as pd
from tables import markdown

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nero_deap.report import complete_ok, load_run  # noqa: E402


def front_at(ind: pd.DataFrame, columns: list, tau: float) -> pd.DataFrame:
    """Non-dominated rows (all columns maximised), feasible rows (clean >= tau) first, as the search ranks."""
    feasible = ind[ind.clean_acc >= tau] if tau > 0 and (ind.clean_acc >= tau).any() else ind
    return feasible[moocore.is_nondominated(feasible[columns].to_numpy(dtype=float), maximise=True,
                                            keep_weakly=True)]


def seed_of(run: dict) -> str:
    return run["name"].rsplit("-", 1)[-1]


def main(root: Path, per_seed: bool = False) -> None:
    runs = [load_run(p) for p in sorted(root.iterdir()) if (p / "gens.csv").exists()]
    totals = {run["name"]: run["gens"].wall_s.sum() for run in runs}
    budgets = {run["name"]: min(totals[other["name"]] for other in runs
                                if not per_seed or seed_of(other) == seed_of(run)) for run in runs}
    rows = []
    for run in runs:
        budget = budgets[run["name"]]
        min_clean = tomllib.loads((run["dir"] / "config.toml").read_text()).get("min_clean", 0.0)
        robust = next(o for o in run["objectives"] if o.robust)
        g = run["gens"]
        within = g[g.wall_s.cumsum() <= budget + 1e-9]
        last = int(within.gen.max())
        ind = run["individuals"][run["individuals"].gen <= last]
        complete = complete_ok(ind)
        front = front_at(complete, [o.column for o in run["objectives"]], min_clean)
        rows.append({"run": run["name"], "fidelity": run["fidelity"], "generations": last + 1,
                     "minutes": within.wall_s.sum() / 60, "evaluations": len(ind),
                     "fully trained": len(complete), "HV": within.hypervolume.iloc[-1],
                     "best clean (front)": front.clean_acc.max(), f"best {robust.name} (front)": front[robust.column].max(),
                     "front": len(front)})
    table = pd.DataFrame(rows)
    if per_seed:
        table.insert(1, "T (min)", [budgets[name] / 60 for name in table.run])
        print("Equal wall-clock budget per seed: T = the shorter total of the seed's two runs\n")
    else:
        print(f"Equal wall-clock budget T = {min(budgets.values()) / 60:.1f} min (the shortest run's total)\n")
    print(markdown(table))
    print()
    print(markdown(table.groupby("fidelity").agg(runs=("run", "count"), HV_median=("HV", "median"),
                                                 fully_trained=("fully trained", "mean")).reset_index(), 4))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--per-seed"]
    main(Path(args[0] if args else "runs/fidelity"), per_seed="--per-seed" in sys.argv[1:])
