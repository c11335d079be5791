"""summary.json of experiments/headline.sh, from its run directories (pandas and json only).

    python experiments/headline_summary.py --search RUN [--baseline RUN] [--device-info FILE] [--steps FILE]
                                           [--mode full|dry-run] --out summary.json

RUN (--search) is the search's run directory; the evolved network's final (``nero-deap final RUN --select
pareto --top 1``) writes its final.csv there too.  --baseline is the hand-designed network's run directory
(experiments/headline_rundir.py baseline).  Per network and per stage (1: the search's weights or training,
scored on the test split; 2: standard retraining on train + validation; 3: adversarial training): clean,
fgsm, pgd20, autoattack (accuracies), n_test, aa_n, seconds (training seconds, final.csv's train_s),
masking (the audit's flag) and its reasons; the search's evaluations, generations and wall clock (gens.csv);
the device and torch version (--device-info: a JSON object written by headline.sh where torch is
importable; RUN/device.json: the machine the search ran on).  Numbers that are not finite are null.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

STAGES = {"search": 1, "standard": 2, "fgsm-rs": 3, "pgd": 3}


def number(value):
    """A JSON-safe number: None for NaN/inf/missing."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def network(run: Path) -> dict:
    """The rows of RUN/final.csv by stage; {} when there is none."""
    path = run / "final.csv"
    if not path.exists():
        return {}
    table = pd.read_csv(path)
    if table.empty:
        return {}
    first = table.iloc[0]
    out = {"run": str(run), "arch": int(first.arch), "params": int(first.params), "flops": int(first.flops),
           "phenotype": str(first.phenotype), "final_settings": read_json(run / "final-settings.json"),
           "stages": {}}
    for _, r in table.iterrows():
        stage = STAGES.get(str(r["mode"]))
        if stage is None:
            continue
        reasons = r.get("masking_reasons")
        out["stages"][str(stage)] = {
            "mode": str(r["mode"]), "source": str(r.source), "epochs": number(r.epochs),
            "clean": number(r.clean), "fgsm": number(r.fgsm), "pgd20": number(r.pgd),
            "autoattack": number(r.autoattack), "n_test": int(r.n_test), "aa_n": int(number(r.aa_n) or 0),
            "seconds": number(r.train_s), "masking": bool(r.masking) if str(r.masking) in ("True", "False") or
            isinstance(r.masking, bool) else None,
            "masking_reasons": reasons if isinstance(reasons, str) else ""}
    return out


def search_summary(run: Path) -> dict:
    gens = pd.read_csv(run / "gens.csv")
    inds = pd.read_csv(run / "individuals.csv")
    config = {}
    try:
        import tomllib

        config = tomllib.loads((run / "config.toml").read_text())
    except (OSError, ValueError, ImportError):
        pass
    wall = float(gens.wall_s.sum())
    return {"run": str(run), "evaluations": int(gens.nevals.sum()), "generations": int(gens.gen.max()),
            "wall_s": round(wall, 1), "evals_per_h": round(gens.nevals.sum() / wall * 3600, 1) if wall else None,
            "failed": int((inds.status != "ok").sum()) if "status" in inds else None,
            "best_clean": number(inds.clean_acc.max()) if "clean_acc" in inds else None,
            "best_fgsm": number(inds.fgsm_acc.max()) if "fgsm_acc" in inds else None,
            "hypervolume": number(gens.hypervolume.iloc[-1]) if "hypervolume" in gens else None,
            "flagged": int(gens.flagged.sum()) if "flagged" in gens else None,
            "config": {k: config.get(k) for k in ("data", "grammar", "population", "generations", "epochs",
                                                  "min_clean", "objectives", "workers_per_gpu", "audit",
                                                  "audit_n", "masking", "seed", "val_size", "eps")},
            "device": read_json(run / "device.json")}


def steps(path) -> list:
    if not path or not Path(path).exists():
        return []
    rows = [line.split("\t") for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"step": r[0], "exit": r[1], "seconds": int(r[2]) if r[2].isdigit() else r[2]} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--search", required=True)
    p.add_argument("--baseline")
    p.add_argument("--baseline-arch", default="grammars/reference/vgg-small.txt")
    p.add_argument("--device-info")
    p.add_argument("--steps")
    p.add_argument("--mode", default="full")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    search = Path(a.search)
    device = read_json(a.device_info) if a.device_info else None
    summary = {"mode": a.mode, "date": pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M UTC"),
               "device": (device or {}).get("device"), "torch": (device or {}).get("torch"),
               "search": search_summary(search),
               "networks": {"evolved": {"what": "the search's choice: Pareto front, best normalised sum "
                                                "(final --select pareto --top 1)", **network(search)}},
               "steps": steps(a.steps)}
    if a.baseline:
        summary["networks"]["baseline"] = {"what": f"hand-designed, {a.baseline_arch}", **network(Path(a.baseline))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    for name, net in summary["networks"].items():
        for stage, s in sorted(net.get("stages", {}).items()):
            print(f"{name:<8} stage {stage} ({s['mode']:<8}) clean {s['clean']}  fgsm {s['fgsm']}  "
                  f"pgd20 {s['pgd20']}  autoattack {s['autoattack']} (n_test {s['n_test']}, AA n {s['aa_n']})  "
                  f"train {s['seconds']} s  masking {s['masking']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
