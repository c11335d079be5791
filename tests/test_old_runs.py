"""Run directories written before the package was split into layers still resume, report and load.

``tests/fixtures/run-v2`` was written by the flat-module layout (every module
directly under ``nero_deap/``): its checkpoint names ``nero_deap.evolution``
and ``nero_deap.genotype`` classes, which now live in sub-packages.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from conftest import resume_run
from nero_deap import load_model, load_run
from nero_deap.commands.report import write_report
from nero_deap.store.logbook import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "run-v2"


def test_the_fixture_names_the_flat_layout():
    """The fixture really is an old checkpoint: it names the modules that no longer exist."""
    blob = (FIXTURE / "checkpoint.pkl").read_bytes()
    assert b"nero_deap.evolution" in blob and b"nero_deap.genotype" in blob
    assert b"nero_deap.search" not in blob


def test_a_run_from_the_flat_layout_resumes_and_reports(tmp_path):
    run = tmp_path / "run-v2"
    shutil.copytree(FIXTURE, run)
    state = load_checkpoint(run / "checkpoint.pkl")
    assert state["gen"] == 1 and len(state["population"]) == 4
    before = pd.read_csv(run / "individuals.csv", dtype=str)
    proc = resume_run(run, 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed after generation 1" in proc.stdout
    gens, ind = pd.read_csv(run / "gens.csv"), pd.read_csv(run / "individuals.csv", dtype=str)
    assert list(gens.gen) == [0, 1, 2]
    kept = [c for c in before.columns if c not in ("train_s", "audit_s")]  # the resume adds newer columns
    pd.testing.assert_frame_equal(ind.iloc[:len(before)][kept], before[kept])
    assert "zero_grad" in ind.columns
    assert b"nero_deap.search.evolution" in (run / "checkpoint.pkl").read_bytes()  # rewritten in the new layout
    tables = load_run(run)
    assert set(tables["pareto"].id) <= set(tables["individuals"].id.astype(int))
    write_report([run], tmp_path / "report", echo=lambda *a: None)
    assert (tmp_path / "report" / "objectives.png").exists()


def test_weights_of_the_flat_layout_load():
    model = load_model(FIXTURE / "weights" / "0.pt")
    assert not model.training and model.params > 0
