"""``nero-deap report RUN [RUN ...]``: plots and a summary of one or several searches.

Writes PNGs and ``summary.md`` (into ``RUN/report/`` for one run, or
``--out``), and prints a table:

* ``objectives.png``: every evaluation in (clean, FGSM) space coloured by
  generation, the final Pareto front drawn as a step line;
* ``hypervolume.png``: hypervolume (reference (0,0)) per generation;
* ``progress.png``: average and best of each objective per generation;
* ``hypervolume_runs.png`` (several runs): median and inter-quartile spread.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from .config import ConfigError


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    needed = ["gens.csv", "individuals.csv", "pareto.csv"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise ConfigError(f"{run_dir}: not a search run (missing {', '.join(missing)})")
    return {"name": run_dir.name, "dir": run_dir, **{n[:-4]: pd.read_csv(run_dir / n) for n in needed}}


def summary_table(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        g, ind, front = r["gens"], r["individuals"], r["pareto"]
        rows.append({"run": r["name"], "generations": int(g.gen.max()), "evaluations": len(ind),
                     "failed": int((ind.status != "ok").sum()), "best_clean": ind.clean_acc.max(),
                     "best_fgsm": ind.fgsm_acc.max(), "hypervolume": g.hypervolume.iloc[-1],
                     "front_size": len(front), "eval_hours": ind.train_s.sum() / 3600})
    return pd.DataFrame(rows)


@contextmanager
def _figure(path: Path, size: tuple = (6.4, 4)):
    """Yield (fig, ax); lay out, save at 120 dpi and close on exit."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield fig, ax
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _upper(values: pd.Series) -> float:
    """An axis limit that shows the data, not the empty rest of [0, 1]."""
    return min(1.0, max(0.05, float(values.max()) * 1.15))


def _front_steps(front: pd.DataFrame) -> tuple:
    pts = front.sort_values("clean_acc")[["clean_acc", "fgsm_acc"]].to_numpy()
    return pts[:, 0], pts[:, 1]


def plot_objectives(run: dict, path: Path) -> None:
    ind, front = run["individuals"], run["pareto"]
    with _figure(path, (6.4, 4.8)) as (fig, ax):
        sc = ax.scatter(ind.clean_acc, ind.fgsm_acc, c=ind.gen, cmap="viridis", s=18, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="generation")
        x, y = _front_steps(front)
        # attainment staircase for maximisation: on (x_i, x_i+1] the best FGSM is y_i+1
        ax.step(x, y, where="pre", color="crimson", lw=1.5, label="final Pareto front")
        ax.scatter(x, y, facecolors="none", edgecolors="crimson", s=50)
        ax.set(xlabel="clean accuracy (validation)", ylabel="FGSM accuracy (validation)",
               title=f"{run['name']}: all evaluations", xlim=(0, _upper(ind.clean_acc)), ylim=(0, _upper(ind.fgsm_acc)))
        ax.legend(loc="upper left")


def plot_hypervolume(run: dict, path: Path) -> None:
    g = run["gens"]
    with _figure(path) as (_, ax):
        ax.plot(g.gen, g.hypervolume, marker="o")
        ax.set(xlabel="generation", ylabel="hypervolume (ref. 0,0)", title=f"{run['name']}: hypervolume")


def plot_progress(run: dict, path: Path) -> None:
    g = run["gens"]
    with _figure(path) as (_, ax):
        for name, color in (("clean", "tab:blue"), ("fgsm", "tab:red")):
            ax.plot(g.gen, g[f"{name}_max"], color=color, marker="o", label=f"{name} max")
            ax.plot(g.gen, g[f"{name}_avg"], color=color, ls="--", label=f"{name} avg")
        ax.set(xlabel="generation", ylabel="accuracy (population)", ylim=(0, 1),
               title=f"{run['name']}: objectives")
        ax.legend()


def plot_hypervolume_runs(runs: list, path: Path) -> None:
    hv = pd.concat([r["gens"].set_index("gen").hypervolume.rename(r["name"]) for r in runs], axis=1)
    hv = hv.ffill()  # a shorter run keeps its last value
    with _figure(path) as (_, ax):
        ax.fill_between(hv.index, hv.quantile(0.25, axis=1), hv.quantile(0.75, axis=1), alpha=0.3,
                        label="inter-quartile range")
        ax.plot(hv.index, hv.median(axis=1), marker="o", label=f"median of {len(runs)} runs")
        ax.set(xlabel="generation", ylabel="hypervolume (ref. 0,0)", title="hypervolume across runs")
        ax.legend()


def write_report(run_dirs: list, out: Path, echo: Callable = print) -> list:
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        prefix = "" if len(runs) == 1 else f"{run['name']}-"
        for name, plot in (("objectives", plot_objectives), ("hypervolume", plot_hypervolume),
                           ("progress", plot_progress)):
            path = out / f"{prefix}{name}.png"
            plot(run, path)
            written.append(path)
    if len(runs) > 1:
        plot_hypervolume_runs(runs, out / "hypervolume_runs.png")
        written.append(out / "hypervolume_runs.png")
    table = summary_table(runs)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    lines = ["# nero-deap search summary", "", "| " + " | ".join(table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    lines += ["", "Accuracies are validation fractions measured during the search; "
                  "see each run's report.md (from `nero-deap final`) for test-set numbers.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in written]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    echo(text)
    echo(f"wrote {len(written)} plots and {out / 'summary.md'}")
    return written


@dataclass
class ReportSettings:
    runs: list  # search run directories
    out: Optional[Path] = None  # default: RUN/report for one run, runs/report for several


def run_report(s: ReportSettings, echo: Callable = print) -> list:
    """Plots and ``summary.md`` for ``s.runs``; returns the PNG paths."""
    out = s.out or (Path(s.runs[0]) / "report" if len(s.runs) == 1 else Path("runs") / "report")
    return write_report([Path(r) for r in s.runs], Path(out), echo)
