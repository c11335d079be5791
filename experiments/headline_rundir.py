"""Run-directory helpers of experiments/headline.sh (no training here, nothing on the GPU).

    python experiments/headline_rundir.py chosen RUN
        the id of the architecture ``nero-deap final RUN --select pareto --top 1`` retrains: the Pareto
        front's best normalised objective sum (README, "Final stage and reports"), by final's own code
    python experiments/headline_rundir.py data RUN ZIP
        point RUN/config.toml's ``data`` at ZIP when the path it holds is not on this machine (a search made
        on a GPU machine and committed, finished on another one); prints what it did
    python experiments/headline_rundir.py baseline SEARCH ARCH_FILE OUT
        a run directory OUT for one hand-designed architecture (e.g. grammars/reference/vgg-small.txt), so
        that ``nero-deap final OUT`` treats it exactly as it treats the search's choice: SEARCH's
        config.toml (same data, split, eps, search budget and seed), and a pareto.csv / individuals.csv of
        one row, id 0, status ok.  Its search-score columns are placeholders (0.0: never measured; only
        final's --select reads them, and with one row there is nothing to choose), named in ``reason``.
        Stage (1) of ``final OUT`` then re-runs the search's own training of it (no weights here: source
        ``retrained``), stages (2)-(3) are final's, with whatever options final is given.

Why a run directory and not a new ``final --architecture`` option: ``final`` needs nothing else, so the
baseline goes through the very same code and settings as the evolved network, and the package is untouched.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pandas as pd


def chosen(run: Path) -> int:
    from nero_deap.commands.final import select_architectures
    from nero_deap.search.objectives import parse
    from nero_deap.store.config import RunConfig, load_toml, merge

    cfg = merge(RunConfig(), load_toml(str(run / "config.toml")), str(run / "config.toml"))
    objectives = parse(cfg.objectives)
    pareto, individuals = pd.read_csv(run / "pareto.csv"), pd.read_csv(run / "individuals.csv")
    pick = select_architectures(pareto, individuals, "pareto", 1, objectives)
    if pick.empty:
        raise SystemExit(f"{run}: no architecture on the front")
    return int(pick.id.iloc[0])


def set_data(run: Path, zip_path: str) -> None:
    import tomli_w

    path = run / "config.toml"
    cfg = tomllib.loads(path.read_text())
    old = str(cfg.get("data", ""))
    if Path(old).is_file() or old == zip_path or old.startswith("synthetic"):
        print(f"{path}: data = {old} (kept)")
        return
    cfg["data"] = zip_path
    path.write_text(tomli_w.dumps(cfg))
    print(f"{path}: data {old} -> {zip_path} (the same CIFAR-10 zip, another machine's path)")


def baseline(search: Path, arch_file: str, out: Path) -> None:
    from nero_deap.commands.evaluate import read_phenotype
    from nero_deap.nets.network import plan_network

    phenotype = read_phenotype(arch_file)
    cfg = tomllib.loads((search / "config.toml").read_text())
    header = list(pd.read_csv(search / "pareto.csv", nrows=0).columns)
    shape = (1, 28, 28) if str(cfg.get("data", "")).startswith(("mnist", "fashion")) else (3, 32, 32)
    sizes = plan_network(phenotype, 10, shape)
    row = {c: "" for c in header}
    row.update({"gen": 0, "id": 0, "parents": "", "params": sizes.params, "flops": sizes.flops, "train_s": 0.0,
                "status": "ok", "reason": f"hand-designed baseline {arch_file}; search scores not measured (0.0)",
                "masking": False, "fidelity": 1.0, "phenotype": phenotype.to_text()})
    for column in header:
        if column.endswith("_acc") and column != "audit_acc":
            row[column] = 0.0
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text((search / "config.toml").read_text())
    for name in ("pareto.csv", "individuals.csv"):
        pd.DataFrame([row], columns=header).to_csv(out / name, index=False)
    print(f"{out}: run directory of {arch_file} ({sizes.params:,} parameters), protocol of {search}/config.toml")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "chosen":
        print(chosen(Path(args[0])))
    elif command == "data":
        set_data(Path(args[0]), args[1])
    elif command == "baseline":
        baseline(Path(args[0]), args[1], Path(args[2]))
    else:
        raise SystemExit(__doc__)
