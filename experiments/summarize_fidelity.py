"""Issue #12's comparison at equal wall-clock: python experiments/summarize_fidelity.py runs/fidelity [--per-seed]

Every run is cut at the same budget T, the largest wall-clock time every run reached (the sum of
gens.csv's wall_s, generation by generation): each run counts the generations it finished within T.
With ``--per-seed`` each seed's pair (``full-sN``, ``halving-sN``) is cut at its own T, the shorter of the
two totals: the budget the experiment gave that pair (a seed whose networks are slow to train is not cut
to a faster seed's budget).
Per run, at T: hypervolume, the best clean and best robust accuracy on the front, the number of fully
trained candidates and of all evaluations.  The front at T is recomputed from individuals.csv: the
fully trained, successful candidates of those generations that no other dominates (constrained by
min_clean as the search was).  Also the hypervolume averaged over [0, T] (``HV time-mean``), which
a cut just before or after a generation's end moves less.  Last, the seeds paired: how often halving leads, by
how much, and whether that is more than chance (sign and signed-rank tests).
"""
import sys
import tomllib
from pathlib import Path

import moocore
import pandas as pd
from tables import markdown, paired_difference, seed_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nero_deap.commands.report import complete_ok, load_run  # noqa: E402


def front_at(ind: pd.DataFrame, columns: list, tau: float) -> pd.DataFrame:
    """Non-dominated rows (all columns maximised), feasible rows (clean >= tau) first, as the search ranks."""
    feasible = ind[ind.clean_acc >= tau] if tau > 0 and (ind.clean_acc >= tau).any() else ind
    return feasible[moocore.is_nondominated(feasible[columns].to_numpy(dtype=float), maximise=True,
                                            keep_weakly=True)]


def time_mean_hypervolume(gens: pd.DataFrame, budget: float) -> float:
    """The hypervolume a run held, averaged over the wall clock [0, budget] (0 until its first generation is
    done): unlike the hypervolume at the cut, it does not jump with where the cut falls relative to a
    generation's end, and it credits reaching a hypervolume early."""
    ends = gens.wall_s.cumsum().to_numpy()  # a generation's hypervolume holds from its end to the next one's
    next_ends = [*ends[1:], float("inf")]
    held = sum(hv * (min(until, budget) - end)
               for hv, end, until in zip(gens.hypervolume, ends, next_ends) if end < budget)
    return held / budget


def paired(table: pd.DataFrame, column: str = "HV") -> str:
    """Halving against plain seed by seed (``column`` at the cut): :func:`tables.paired_difference`."""
    wide = table.assign(seed=table.run.map(seed_of)) \
        .pivot_table(index="seed", columns="fidelity", values=column, aggfunc="first")
    if not {"full", "halving"} <= set(wide.columns):
        return "no seed with both a plain and a halving run"
    return paired_difference(wide["halving"] - wide["full"], f"halving - plain {column}", "halving")


def main(root: Path, per_seed: bool = False) -> None:
    runs = [load_run(p) for p in sorted(root.iterdir()) if (p / "gens.csv").exists()]
    totals = {run["name"]: run["gens"].wall_s.sum() for run in runs}
    budgets = {run["name"]: min(totals[other["name"]] for other in runs
                                if not per_seed or seed_of(other["name"]) == seed_of(run["name"])) for run in runs}
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
                     "HV time-mean": time_mean_hypervolume(g, budget),
                     "best clean (front)": front.clean_acc.max(),
                     f"best {robust.name} (front)": front[robust.column].max(),
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
                                                 HV_time_mean_median=("HV time-mean", "median"),
                                                 fully_trained=("fully trained", "mean")).reset_index(), 4))
    for column in ["HV", "HV time-mean", *(c for c in table.columns if c.startswith("best "))]:
        print()
        print(paired(table, column))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--per-seed"]
    main(Path(args[0] if args else "runs/fidelity"), per_seed="--per-seed" in sys.argv[1:])
