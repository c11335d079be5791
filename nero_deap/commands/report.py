"""``nero-deap report RUN [RUN ...]``: plots and a summary of one or several searches.

Writes PNGs and ``summary.md`` (into ``RUN/report/`` for one run, or
``--out``), and prints a table:

* ``objectives.png``: every evaluation in objective space (one panel per
  pair of the run's objectives) coloured by generation, with the final
  Pareto front (a step line for two maximised objectives);
* ``hypervolume.png``: hypervolume per generation (normalised as in
  :mod:`nero_deap.search.objectives`, reference at the origin);
* ``progress.png``: average and best of each objective per generation;
* ``hypervolume_runs.png`` (several runs): runs are grouped by algorithm,
  objectives and fidelity; per group, the median hypervolume against the
  number of evaluations and against wall-clock minutes (the fair axis when
  ``--fidelity halving`` makes some evaluations cheaper), with the spread
  across runs (seeds); ``summary.md`` adds the table of final hypervolume per
  group.

Candidates that ``--fidelity halving`` stopped early are drawn as grey
crosses and never count as a run's best: their scores come from part of
the budget.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from ..search.objectives import names as objective_names, parse as parse_objectives
from ..store.config import ConfigError, RunConfig, load_toml, merge
from ..store.logbook import read_table


def load_run(run_dir: Path) -> dict:
    """A run's CSVs plus its objectives, algorithm and fidelity (config.toml; older runs: clean,fgsm, nsga2, full)."""
    run_dir = Path(run_dir)
    needed = ["gens.csv", "individuals.csv", "pareto.csv"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise ConfigError(f"{run_dir}: not a search run (missing {', '.join(missing)})")
    saved = load_toml(str(run_dir / "config.toml")) if (run_dir / "config.toml").exists() else {}
    cfg = merge(RunConfig(), {k: v for k, v in saved.items() if k in ("objectives", "algorithm", "fidelity")},
                str(run_dir / "config.toml"))
    try:
        objectives = parse_objectives(cfg.objectives)
    except ValueError as exc:
        raise ConfigError(f"{run_dir / 'config.toml'}: {exc}") from None
    scores = [o.column for o in objectives]
    frames = {"gens": read_table(run_dir / "gens.csv", ["gen", "hypervolume"],
                                 ["gen", "hypervolume", "nevals", "wall_s", "flagged"]),
              "individuals": read_table(run_dir / "individuals.csv", ["gen", "status", *scores],
                                        ["gen", "train_s", "fidelity"], scores),
              "pareto": read_table(run_dir / "pareto.csv", scores, [], scores)}
    if frames["gens"].empty:
        raise ConfigError(f"{run_dir / 'gens.csv'}: no generation recorded")
    ind = frames["individuals"]  # runs from before --fidelity (or their rows, after a resume): trained fully
    ind["fidelity"] = ind.get("fidelity", pd.Series(1.0, index=ind.index)).fillna(1.0)
    given = {k: saved[k] for k in SETTING_KEYS if k in saved}  # absent keys: the defaults they ran with
    defaults = asdict(merge(RunConfig(), given, str(run_dir / "config.toml")))
    setting = {k: Path(str(defaults[k])).name if k in ("grammar", "data") else defaults[k] for k in SETTING_KEYS}
    return {"name": run_dir.name, "dir": run_dir, "objectives": objectives, "algorithm": cfg.algorithm,
            "fidelity": cfg.fidelity, "planned": saved.get("generations"), "setting": setting, **frames}


# What makes two runs seeds of one experiment besides algorithm, objectives and fidelity (the group's name).
SETTING_KEYS = ("grammar", "data", "epochs", "population", "train_subset", "val_size", "eps", "max_seconds")


def run_state(run: dict) -> str:
    """``finished``, ``stopped at gen G of N`` (killed, or still running) or ``all failed``: only finished runs
    with a successful candidate count in their group's hypervolume (a run stopped at generation 0 with every
    candidate failed once counted as a seed with hypervolume 0)."""
    if not (run["individuals"].status == "ok").any():
        return "all failed"
    last, planned = int(run["gens"].gen.max()), run.get("planned")
    if isinstance(planned, int) and not isinstance(planned, bool) and last < planned:
        return f"stopped at gen {last} of {planned}"
    return "finished"


def complete_ok(individuals: pd.DataFrame) -> pd.DataFrame:
    """The evaluations that trained their full budget and succeeded: the ones a run's best can come from."""
    return individuals[(individuals.status == "ok") & (individuals.fidelity >= 1)]


def group_name(run: dict) -> str:
    """Runs are compared within a group: same algorithm, same objectives, same fidelity."""
    fidelity = "" if run.get("fidelity", "full") == "full" else f", {run['fidelity']}"
    return f"{run['algorithm']} on {objective_names(run['objectives'])}{fidelity}"


def summary_table(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        g, ind, front = r["gens"], r["individuals"], r["pareto"]
        row = {"run": r["name"], "group": group_name(r), "state": run_state(r), "generations": int(g.gen.max()),
               "evaluations": len(ind),
               "failed": int((ind.status != "ok").sum()), "stopped": int((ind.fidelity < 1).sum())}
        for o in r["objectives"]:
            ok = complete_ok(ind)[o.column]
            row[f"best_{o.name}"] = (ok.max() if o.maximise else ok.min()) if len(ok) else float("nan")
        ok_front = front[front.status == "ok"] if "status" in front else front
        row.update({"hypervolume": g.hypervolume.iloc[-1], "front_size": len(ok_front),
                    "flagged": int(g.flagged.iloc[-1]) if "flagged" in g else 0,
                    "eval_hours": ind.train_s.sum() / 3600, "wall_hours": g.wall_s.sum() / 3600})
        rows.append(row)
    return pd.DataFrame(rows)


def group_table(runs: list) -> pd.DataFrame:
    """Final hypervolume per group over its finished runs (seeds): median, range, how many; ``left_out``
    counts the group's runs that are not finished (:func:`run_state`)."""
    table = summary_table(runs)
    finished = table[table.state == "finished"]
    stats = (finished.groupby("group", sort=False).hypervolume
             .agg(runs="count", median="median", min="min", max="max"))
    left_out = (table.state != "finished").groupby(table.group, sort=False).sum().rename("left_out")
    return stats.reindex(left_out.index).assign(runs=lambda t: t.runs.fillna(0).astype(int)).join(left_out) \
        .reset_index()


def setting_differences(runs: list) -> list:
    """One line per group whose runs differ in a :data:`SETTING_KEYS` value: not seeds of one experiment."""
    lines = []
    for group in dict.fromkeys(group_name(r) for r in runs):
        members = [r for r in runs if group_name(r) == group]
        differ = [k for k in SETTING_KEYS if len({repr(r["setting"].get(k)) for r in members}) > 1]
        if differ:
            lines.append(f"warning: the runs of group '{group}' differ in {', '.join(differ)}: "
                         "their spread is not a spread over seeds")
    return lines


@contextmanager
def _figure(path: Path, size: tuple = (6.4, 4), ncols: int = 1):
    """Yield (fig, first axes; ``fig.axes`` holds all ``ncols``); lay out, save at 120 dpi and close on exit."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=size, squeeze=ncols == 1, layout="constrained")
    yield fig, (ax if ncols == 1 else ax[0][0])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_sweep(text: object) -> list:
    """final.csv's ``eps_sweep`` cell (``eps:accuracy;...``) as (eps, accuracy) pairs; [] if empty or damaged."""
    try:
        return [tuple(float(v) for v in point.split(":")) for point in str(text).split(";")] \
            if isinstance(text, str) and text else []
    except ValueError:
        return []


def plot_eps_sweep(table: pd.DataFrame, path: Path, eps: float) -> bool:
    """Each final model's accuracy under PGD-10 against epsilon, the run's epsilon marked: the curve must fall
    towards 0 as epsilon grows (one that stays flat is masking gradients, not robust).  False, and no file, if
    no row has a sweep (all diverged)."""
    import matplotlib

    matplotlib.use("Agg")
    curves = [(f"arch {r.arch} {r.mode}", parse_sweep(r.eps_sweep)) for r in table.itertuples()]
    curves = [(label, points) for label, points in curves if points]
    if not curves:
        return False
    with _figure(path, (7, 4.2)) as (_, ax):
        for label, points in curves:
            ax.plot([255 * e for e, _ in points], [a for _, a in points], marker="o", label=label)
        ax.axvline(255 * eps, linestyle="--", color="grey", label=f"the run's eps, {255 * eps:.0f}/255")
        ax.set(xlabel="epsilon (L-inf, /255 on [0,1] pixels)", ylabel="test accuracy under PGD-10", ylim=(0, 1),
               title="robustness against attack strength (should fall to 0)")
        ax.legend(fontsize="small")
    return True


def _limits(values: pd.Series, objective) -> tuple:
    """Axis limits that show the data, not the empty rest of [0, 1] (sizes: the data's range)."""
    if objective.bound is None:
        return 0, min(1.0, max(0.05, float(values.max()) * 1.15))
    return None, None


def _axis_label(objective) -> str:
    return objective.label if objective.bound is not None else f"{objective.label} (validation)"


def _front_steps(front: pd.DataFrame, x: str, y: str) -> tuple:
    pts = front.sort_values(x)[[x, y]].to_numpy()
    return pts[:, 0], pts[:, 1]


FEW_GENERATIONS = 12  # up to this many, one colour per generation (a discrete colour bar)


def integer_axis(axis) -> None:
    """Ticks at whole numbers only on ``axis`` (generations, evaluations): 0.2 of a generation means nothing."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def generation_colours(generations: pd.Series) -> dict:
    """``scatter`` keywords colouring points by generation: one colour per generation when there are few of
    them, with a colour bar ticked at each; a continuous map over many."""
    import matplotlib
    from matplotlib.colors import BoundaryNorm

    low, high = int(generations.min()), int(generations.max())
    count = high - low + 1
    if count > FEW_GENERATIONS:
        return {"cmap": "viridis", "vmin": low, "vmax": high}
    cmap = matplotlib.colormaps["viridis"].resampled(max(count, 2))
    return {"cmap": cmap, "norm": BoundaryNorm([g - 0.5 for g in range(low, high + 2)], cmap.N)}


def plot_objectives(run: dict, path: Path) -> None:
    """Every evaluation coloured by generation, for each pair of objectives, with the final front."""
    ind, front, objs = run["individuals"], run["pareto"], run["objectives"]
    pairs = list(combinations(objs, 2))[:6]
    with _figure(path, (5.6 * len(pairs), 4.8), ncols=len(pairs)) as (fig, _):
        for ax, (ox, oy) in zip(fig.axes, pairs):
            full, stopped = ind[ind.fidelity >= 1], ind[ind.fidelity < 1]
            sc = ax.scatter(full[ox.column], full[oy.column], c=full.gen, s=18, alpha=0.8,
                            **generation_colours(ind.gen))
            if len(stopped):
                ax.scatter(stopped[ox.column], stopped[oy.column], marker="x", color="0.6", s=18,
                           label="stopped early (--fidelity halving)")
            x, y = _front_steps(front, ox.column, oy.column)
            if len(objs) == 2 and ox.maximise and oy.maximise:
                # attainment staircase for maximisation: on (x_i, x_i+1] the best y is y_i+1
                ax.step(x, y, where="pre", color="crimson", lw=1.5, label="final Pareto front")
            ax.scatter(x, y, facecolors="none", edgecolors="crimson", s=50,
                       label=None if len(objs) == 2 else "final Pareto front")
            ax.set(xlabel=_axis_label(ox), ylabel=_axis_label(oy),
                   title=f"{run['name']}: all evaluations", xlim=_limits(ind[ox.column], ox),
                   ylim=_limits(ind[oy.column], oy))
            ax.set_xscale("linear" if ox.bound is None else "log")
            ax.set_yscale("linear" if oy.bound is None else "log")
            ax.legend(loc="upper left")
        bar = fig.colorbar(sc, ax=fig.axes, label="generation")
        if ind.gen.max() - ind.gen.min() < FEW_GENERATIONS:
            bar.set_ticks(range(int(ind.gen.min()), int(ind.gen.max()) + 1))
        else:
            integer_axis(bar.ax.yaxis)


def plot_hypervolume(run: dict, path: Path) -> None:
    g = run["gens"]
    with _figure(path) as (_, ax):
        ax.plot(g.gen, g.hypervolume, marker="o")
        integer_axis(ax.xaxis)
        ax.set(xlabel="generation", ylabel="hypervolume (normalised, ref. origin)",
               title=f"{run['name']}: hypervolume")


def plot_progress(run: dict, path: Path) -> None:
    """Population average and best of each objective per generation, one panel per objective."""
    g, objs = run["gens"], run["objectives"]
    with _figure(path, (4.2 * len(objs), 4), ncols=len(objs)) as (fig, _):
        for ax, o in zip(fig.axes, objs):
            best = f"{o.name}_max" if o.maximise else f"{o.name}_min"
            ax.plot(g.gen, g[best], marker="o", label="best")
            ax.plot(g.gen, g[f"{o.name}_avg"], ls="--", label="average")
            ax.set(xlabel="generation", ylabel=o.label, title=f"{run['name']}: {o.name}")
            integer_axis(ax.xaxis)
            if o.bound is None:
                ax.set_ylim(0, 1)
            else:
                ax.set_yscale("log")
            ax.legend()


def hypervolume_by_evaluations(run: dict) -> pd.Series:
    """Hypervolume after each generation, indexed by the evaluations spent so far."""
    g = run["gens"]
    return pd.Series(g.hypervolume.to_numpy(), index=g.nevals.cumsum().to_numpy(), name=run["name"])


def hypervolume_by_minutes(run: dict) -> pd.Series:
    """Hypervolume after each generation, indexed by the wall-clock minutes spent so far."""
    g = run["gens"]
    return pd.Series(g.hypervolume.to_numpy(), index=(g.wall_s.cumsum() / 60).to_numpy(), name=run["name"])


def plot_hypervolume_runs(runs: list, path: Path) -> None:
    """Per group: median hypervolume against evaluations and against minutes, with the spread across seeds
    (finished runs only, as in the group table; each run's own plots show the others)."""
    runs = [r for r in runs if run_state(r) == "finished"]  # the seeds group_table counts
    with _figure(path, (12, 4.5), ncols=2) as (fig, _):
        for ax, (axis, by) in zip(fig.axes, (("evaluations", hypervolume_by_evaluations),
                                             ("wall-clock minutes", hypervolume_by_minutes))):
            groups: dict = {}
            for r in runs:
                groups.setdefault(group_name(r), []).append(by(r))
            for name, series in groups.items():
                hv = pd.concat(series, axis=1).sort_index().ffill()  # a run without a point there keeps its last
                # steps, not slopes: a run's hypervolume holds until its next generation ends, so the median
                # line and the band between the runs' extremes change only there (no jagged vertical edges)
                line, = ax.plot(hv.index, hv.median(axis=1), marker="o", drawstyle="steps-post",
                                label=f"{name} (median of {hv.shape[1]})")
                ax.fill_between(hv.index, hv.min(axis=1), hv.max(axis=1), alpha=0.2, color=line.get_color(),
                                step="post", linewidth=0)
            if axis == "evaluations":
                integer_axis(ax.xaxis)
            ax.set(xlabel=axis, ylabel="hypervolume (normalised, ref. origin)",
                   title=f"hypervolume by group and {axis.split()[-1]} (band: spread across runs)")
        if groups:  # below both panels, where it covers no data
            fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize="small",
                       ncols=min(3, len(groups)))


def distinct_names(run_dirs: list) -> list:
    """Each run's folder name, or parent-name where two runs share one (a/s1, b/s1): plots are named after runs,
    and runs of the same name once overwrote each other's."""
    names = [d.name for d in run_dirs]
    names = [f"{d.resolve().parent.name}-{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]
    return [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names)]


def write_report(run_dirs: list, out: Path, echo: Callable = print) -> list:
    import matplotlib

    matplotlib.use("Agg")
    seen = {}
    for d in run_dirs:
        if Path(d).resolve() in seen:  # twice the same run would count as two seeds of its group
            raise ConfigError(f"{d}: named twice (as {seen[Path(d).resolve()]})")
        seen[Path(d).resolve()] = d
    runs = [load_run(d) for d in run_dirs]
    for run, name in zip(runs, distinct_names([Path(d) for d in run_dirs])):
        run["name"] = name
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
    if len(runs) > 1:
        groups = group_table(runs)
        lines += ["", "## Final hypervolume per group (finished runs)", "",
                  "| group | runs | median | min | max | left out (not finished) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.group} | {r.runs} | {r['median']:.4f} | {r['min']:.4f} | {r['max']:.4f} | {r.left_out} |"
                  for _, r in groups.iterrows()]
        text += "\n\n" + groups.to_string(index=False, float_format=lambda v: f"{v:.4f}")
        warnings = setting_differences(runs)
        lines += [""] + warnings if warnings else []
        text += "".join("\n" + w for w in warnings)
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
