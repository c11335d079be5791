"""Tables for RESULTS.md from experiments/robust_signal.sh's output: python experiments/summarize_signal.py runs/signal

Per run: final hypervolume, evaluations, front size, audited and flagged front members, low-capacity
front members (under LOW_FLOPS forward FLOPs per image: a single small conv or none) and whether the
front's best robustness score belongs to one; per group: hypervolume median and range; per run with a
final: the best stage-(2) PGD-20 and AutoAttack of the models final's audit did not flag, and Kendall's tau from agreement.csv; the masking
audit's measured share of the search's wall clock (gens.csv audit_s / wall_s, runs that record it).
"""
import sys
import tomllib
from pathlib import Path

import pandas as pd
from tables import markdown, paired_difference, seed_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOW_FLOPS = 1e6


def main(root: Path) -> None:
    rows = []
    for run in sorted(p for p in root.iterdir() if (p / "gens.csv").exists()):
        cfg = tomllib.loads((run / "config.toml").read_text())
        robust = [n for n in cfg["objectives"].split(",") if n != "clean"][0]
        gens, front = pd.read_csv(run / "gens.csv"), pd.read_csv(run / "pareto.csv")
        low = front.flops < LOW_FLOPS
        best = front.loc[front[f"{robust}_acc"].idxmax()]
        row = {"run": run.name, "group": f"{cfg['algorithm']} on {cfg['objectives']}",
               "evaluations": int(gens.nevals.sum()), "HV": gens.hypervolume.iloc[-1], "front": len(front),
               "audited": int(front.audit_acc.notna().sum()), "flagged": int(front.masking.eq(True).sum()),
               "max gap (robust - audit)": (front[f"{robust}_acc"] - front.audit_acc).max(),
               "low-capacity on front": int(low.sum()),
               "best robust is low-capacity": bool(best.flops < LOW_FLOPS)}
        if "audit_s" in gens:
            row.update({"audit share of wall": gens.audit_s.sum() / gens.wall_s.sum(),
                        "audit / training": gens.audit_s.sum() / gens.train_s.sum()})
        if (run / "final.csv").exists():
            final = pd.read_csv(run / "final.csv")
            std = final[(final["mode"] == "standard") & ~final.masking.astype(bool)]  # not a collapsed model
            row.update({"best stage-2 PGD-20": std.pgd.max(), "its AA": std.loc[std.pgd.idxmax(), "autoattack"],
                        "best stage-2 clean": std.clean.max()})
        rows.append(row)
    table = pd.DataFrame(rows)
    print(markdown(table))
    print()
    groups = table.groupby("group", sort=False).HV.agg(runs="count", median="median", min="min", max="max")
    print(markdown(groups.reset_index(), 4))
    search_against_random(root)
    for run in sorted(root.glob("*/agreement.csv")):
        tau = pd.read_csv(run).pivot(index="objective", columns="metric", values="tau")
        p = pd.read_csv(run).pivot(index="objective", columns="metric", values="p_value")
        cells = tau.map(lambda t: f"{t:+.2f}") + " (p " + p.map(lambda v: f"{v:.2f}") + ")"
        print(f"\n{run.parent.name}: Kendall's tau, search objective vs stage-(2) test metric\n")
        print(markdown(cells.reset_index()))
    if not any(root.glob("*/final.csv")):
        return  # searches only (FINAL_SEEDS=none): nothing to pool
    pooled = pooled_agreement(root)
    cells = pooled.apply(lambda r: f"{r.tau:+.2f} (p {r.p_value:.2f}, n {r.n})", axis=1)
    print("\nPooled over all runs' finals: Kendall's tau, search objective vs stage-(2) test metric\n")
    print(markdown(pooled.assign(cell=cells).pivot(index="objective", columns="metric", values="cell").reset_index()))


SEARCH, RANDOM = "nsga2-fgsm", "random-fgsm"  # the runs robust_signal.sh names, seed by seed


def search_against_random(root: Path) -> None:
    """NSGA-II against random search on clean,fgsm, seed by seed: hypervolume after the same generations
    (the same number of evaluations, give or take the duplicates NSGA-II does not retrain), at the shortest
    pair's last generation and at every generation both reached, with the paired tests of
    :func:`tables.paired_difference`."""
    hv = {}
    for run in root.glob(f"{SEARCH}-s*/gens.csv"):
        twin = root / run.parent.name.replace(SEARCH, RANDOM, 1) / "gens.csv"
        if twin.exists():
            a, b = pd.read_csv(run), pd.read_csv(twin)
            hv[seed_of(run.parent.name)] = (a.set_index("gen"), b.set_index("gen"))
    if not hv:
        return
    last = min(min(a.index.max(), b.index.max()) for a, b in hv.values())
    rows = [{"seed": seed, "generation": last, "evaluations NSGA-II / random":
             f"{int(a.nevals.loc[:last].sum())} / {int(b.nevals.loc[:last].sum())}",
             "HV NSGA-II": a.hypervolume.loc[last], "HV random": b.hypervolume.loc[last]}
            for seed, (a, b) in sorted(hv.items(), key=lambda kv: int(kv[0].lstrip("s")))]
    print(f"\nNSGA-II against random search on clean,fgsm, seed by seed, after generation {last}\n")
    print(markdown(pd.DataFrame(rows), 4))
    print()
    for gen in range(1, last + 1):
        diff = pd.Series({seed: a.hypervolume.loc[gen] - b.hypervolume.loc[gen] for seed, (a, b) in hv.items()})
        print(f"generation {gen}: " + paired_difference(diff, "NSGA-II - random HV", "NSGA-II"))


def pooled_agreement(root: Path) -> pd.DataFrame:
    """Kendall's tau pooled over every run's finalised architectures, per search objective.

    One run's front gives 2-5 architectures, too few for any tau to reach
    significance; pooled over the runs that scored an objective, the same
    question (does a higher search score go with a better final test number?)
    gets 10-20 pairs.  Ids are prefixed with the run, so they cannot collide.  An architecture finalised
    by two runs (the same seed draws the same initial population in every group) counts once, and
    models ``final``'s audit flagged (a retraining that collapsed to a constant prediction scores chance
    under every attack) are left out."""
    from nero_deap.commands.agreement import agreement_table
    from nero_deap.search.objectives import parse

    search, final, names = [], [], set()
    for run in sorted(p for p in root.iterdir() if (p / "final.csv").exists()):
        cfg = tomllib.loads((run / "config.toml").read_text())
        names |= set(cfg["objectives"].split(","))
        ind = pd.read_csv(run / "individuals.csv")
        std = pd.read_csv(run / "final.csv")
        std = std[(std["mode"] == "standard") & ~std.masking.astype(bool)].copy()
        ind["id"], std["arch"] = run.name + ":" + ind.id.astype(str), run.name + ":" + std.arch.astype(str)
        search.append(ind)
        final.append(std)
    search, final = pd.concat(search, ignore_index=True), pd.concat(final, ignore_index=True)
    tables = []
    for objective in parse(",".join(sorted(names))):
        has = search[search[objective.column].notna()] if objective.column in search else search.iloc[:0]
        scored = final[final.arch.isin(has.id)].drop_duplicates("phenotype")
        tables.append(agreement_table(has, scored, [objective]))
    return pd.concat(tables, ignore_index=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/signal"))
