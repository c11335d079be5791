"""Issue #12's comparison at equal wall-clock: python experiments/summarize_fidelity.py runs/fidelity

Every run is cut at the same budget T, the largest wall-clock time every run reached (the sum of
gens.csv's wall_s, generation by generation): each run counts the generations it finished within T.
Per run, at T: hypervolume, the best clean and best robust accuracy on the front, the number of fully
trained candidates and of all evaluations.  The front at T is recomputed from individuals.csv: the
fully trained, successful candidates of those generations that no other dominates (constrained by
min_clean as the search was).
"""
import sys
import tomllib
from pathlib import Path

import pandas as pd
from tables import markdown

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nero_deap.objectives import parse  # noqa: E402
from nero_deap.report import complete_ok  # noqa: E402


def front_at(ind: pd.DataFrame, columns: list, tau: float) -> pd.DataFrame:
    """Non-dominated rows (all columns maximised), feasible rows (clean >= tau) first, as the search ranks."""
    feasible = ind[ind.clean_acc >= tau] if tau > 0 and (ind.clean_acc >= tau).any() else ind
    values = feasible[columns].to_numpy()
    keep = [i for i, a in enumerate(values)
            if not any((b >= a).all() and (b > a).any() for b in values)]
    return feasible.iloc[keep]


def main(root: Path) -> None:
    runs = sorted(p for p in root.iterdir() if (p / "gens.csv").exists())
    gens = {run: pd.read_csv(run / "gens.csv") for run in runs}
    budget = min(g.wall_s.sum() for g in gens.values())
    rows = []
    for run in runs:
        cfg = tomllib.loads((run / "config.toml").read_text())
        objectives = parse(cfg["objectives"])
        robust = next(o for o in objectives if o.robust)
        g = gens[run]
        within = g[g.wall_s.cumsum() <= budget + 1e-9]
        last = int(within.gen.max())
        ind = pd.read_csv(run / "individuals.csv")
        ind = ind[ind.gen <= last]
        ind = ind.assign(fidelity=ind.get("fidelity", pd.Series(1.0, index=ind.index)).fillna(1.0))
        complete = complete_ok(ind)
        front = front_at(complete, [o.column for o in objectives], cfg.get("min_clean", 0.0))
        rows.append({"run": run.name, "fidelity": cfg.get("fidelity", "full"), "generations": last + 1,
                     "minutes": within.wall_s.sum() / 60, "evaluations": len(ind),
                     "fully trained": len(complete), "HV": within.hypervolume.iloc[-1],
                     "best clean (front)": front.clean_acc.max(), f"best {robust.name} (front)": front[robust.column].max(),
                     "front": len(front)})
    table = pd.DataFrame(rows)
    print(f"Equal wall-clock budget T = {budget / 60:.1f} min (the shortest run's total)\n")
    print(markdown(table))
    print()
    print(markdown(table.groupby("fidelity").agg(runs=("run", "count"), HV_median=("HV", "median"),
                                                 fully_trained=("fully trained", "mean")).reset_index(), 4))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fidelity"))
