"""The plots a reader looks at: whole generations on every generation axis, at 2 and at 30 generations."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from nero_deap import load_run
from nero_deap.commands import report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-v2"


def stretched(run: dict, generations: int) -> dict:
    """``run`` with its tables spread over ``generations`` generations (as a long search would have)."""
    rng = np.random.default_rng(0)
    gens = pd.concat([run["gens"].iloc[[-1]]] * generations, ignore_index=True).assign(gen=range(generations))
    gens["hypervolume"] = np.sort(rng.uniform(0, 0.3, generations))
    ind = pd.concat([run["individuals"]] * generations, ignore_index=True)
    ind["gen"] = np.repeat(range(generations), len(run["individuals"]))
    ind["clean_acc"] = rng.uniform(0, 1, len(ind))
    return {**run, "gens": gens, "individuals": ind}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots make, kept open for inspection."""
    kept = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def tick_numbers(axis) -> list:
    """The numbers written at an axis's ticks (matplotlib's own labels, after drawing)."""
    axis.figure.canvas.draw()
    return [float(t.get_text().replace("\u2212", "-")) for t in axis.get_ticklabels() if t.get_text()]


@pytest.mark.parametrize("generations", [2, 30])
def test_generation_axes_and_the_colour_bar_show_whole_generations(tmp_path, figures, generations):
    run = stretched(load_run(FIXTURE), generations)
    report.plot_progress(run, tmp_path / "progress.png")
    report.plot_hypervolume(run, tmp_path / "hypervolume.png")
    report.plot_objectives(run, tmp_path / "objectives.png")
    progress, hypervolume, objectives = figures
    for ax in [*progress.axes, *hypervolume.axes]:
        ticks = tick_numbers(ax.xaxis)
        assert ticks and all(t.is_integer() for t in ticks), ticks
    colour_bar = objectives.axes[-1]
    ticks = tick_numbers(colour_bar.yaxis)
    assert ticks and all(t.is_integer() for t in ticks), ticks
    if generations <= report.FEW_GENERATIONS:
        assert ticks == list(range(generations))  # one colour, one tick per generation


def test_the_runs_plot_keeps_its_legend_off_the_data(tmp_path, figures):
    runs = [load_run(FIXTURE), load_run(FIXTURE)]
    runs[1]["name"] = "other"
    report.plot_hypervolume_runs(runs, tmp_path / "runs.png")
    (fig,) = figures
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert all(t.is_integer() for t in tick_numbers(fig.axes[0].xaxis))
