"""Issue #9: objectives as one registry, the masking audit, random search, Kendall's tau, old runs."""
import json
import shutil
import tomllib
from itertools import combinations

import matplotlib
import matplotlib.figure
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import resume_run, ROOT, TINY_GRAMMAR
from nero_deap.search import objectives as objs
from nero_deap.commands.agreement import agreement_table, kendall
from nero_deap.search.audit import AuditResult, AuditSettings, audit_remote, audit_sample, judge
from nero_deap.cli import main
from nero_deap.search.options import option_checks
from nero_deap.store.config import RunConfig
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.data import make_splits
from nero_deap.commands.evaluate import evaluate_architecture, read_phenotype
from nero_deap.nets.export import model_bytes
from nero_deap.search.fitness import EvalContext
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.commands.report import load_run, summary_table, write_report
from nero_deap.commands.search import run_search
from nero_deap.engine.train import TrainSettings, train

matplotlib.use("Agg")
SMALL = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:-1 | "
         "layer:pool-max kernel-size:2 stride:2 input:0 | "
         "layer:conv num-filters:16 filter-shape:3 stride:1 padding:same act:relu input:1 | "
         "layer:fc num-units:10 act:softmax input:2 || learning:adam lr:0.003 batch_size:32")


def search(tmp_path, name, **options):
    settings = {"grammar": str(TINY_GRAMMAR), "data": "synthetic:200", "val_size": 60, "population": 4,
                "generations": 1, "epochs": 1, "threads": 1, "seed": 5, "out": str(tmp_path / name), **options}
    cfg = RunConfig(**settings).validate(option_checks())
    lines = []
    run_search(cfg, echo=lines.append)
    return tmp_path / name, lines


def dominates(a, b, directions):
    better_or_equal = all((x >= y) if up else (x <= y) for x, y, up in zip(a, b, directions))
    return better_or_equal and tuple(a) != tuple(b)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    s = make_splits(load_raw("synthetic:400"), val_size=100)
    torch.manual_seed(0)
    model = build_network(Phenotype.from_text(SMALL), mean=s.mean, std=s.std)
    train(model, Phenotype.from_text(SMALL).learning, s.train_x, s.train_y, TrainSettings(epochs=3, seed=0))
    return model.eval(), s


# ------------------------------------------------------------------ registry
def test_registry_parses_names_and_refuses_bad_lists():
    assert [o.name for o in objs.parse("clean, fgsm")] == ["clean", "fgsm"]
    pgd = objs.get("pgd7")
    assert pgd.robust and pgd.maximise and pgd.column == "pgd7_acc"
    assert objs.get("params").column == "params" and not objs.get("params").maximise
    for bad in ("clean", "clean,clean", "clean,pgd0", "clean,wat"):
        with pytest.raises(ValueError):
            objs.parse(bad)
    with pytest.raises(Exception, match="objectives"):
        RunConfig(objectives="fgsm").validate(option_checks())


def test_size_normalisation_and_hypervolume_in_three_dimensions():
    params = objs.get("params")
    assert params.normalised(0) == 1.0 and params.normalised(1e8) == pytest.approx(0.0)
    assert params.normalised(1e4) == pytest.approx(1 - 4.0000434 / 8.0000000434, abs=1e-6)
    three = objs.parse("clean,fgsm,params")
    # one point: the box volume of its normalised coordinates
    assert objs.hypervolume([(0.5, 0.4, 1e4)], three) == pytest.approx(0.5 * 0.4 * params.normalised(1e4))
    # a dominated point adds nothing
    assert objs.hypervolume([(0.5, 0.4, 1e4), (0.4, 0.3, 1e5)], three) == pytest.approx(
        objs.hypervolume([(0.5, 0.4, 1e4)], three))


def test_pgd_accuracy_is_at_most_fgsm_accuracy_on_a_trained_model(trained):
    model, s = trained
    m = objs.Measure(s.val_x, s.val_y, 8 / 255, 100, seed=1)
    clean, fgsm, pgd5 = objs.measure(objs.parse("clean,fgsm,pgd5"), model, m)
    assert clean > 0.3  # it learned something, so the comparison means something
    assert pgd5 <= fgsm + 0.02 and pgd5 <= clean


def test_a_dummy_objective_reaches_csvs_hypervolume_and_plots(tmp_path, monkeypatch):
    dummy = objs.register(objs.Objective("dummy", "dummy score", True, lambda model, m, cache: model.params % 7 / 7))
    try:
        run, lines = search(tmp_path, "dummy", objectives="clean,dummy", audit="none")
        ind, gens, front = (pd.read_csv(run / f) for f in ("individuals.csv", "gens.csv", "pareto.csv"))
        ok = ind[ind.status == "ok"]
        assert (ok.dummy_acc == ok.params % 7 / 7).all()
        assert {"dummy_avg", "dummy_max"} <= set(gens.columns) and "dummy avg" in [line for line in lines if line.startswith("gen ")][-1]
        assert gens.hypervolume.iloc[-1] == pytest.approx(
            objs.hypervolume(front[["clean_acc", "dummy_acc"]].to_numpy(), objs.parse("clean,dummy")))
        labels = []
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: labels.extend(
            ax.get_xlabel() + "|" + ax.get_ylabel() for ax in fig.axes))
        write_report([run], tmp_path / "report", echo=lambda *a: None)
        assert any("dummy score" in label for label in labels)
    finally:
        objs.OBJECTIVES.pop(dummy.name)


def test_three_objective_front_has_no_dominated_row(tmp_path):
    run, _ = search(tmp_path, "three", objectives="clean,pgd3,params", audit="none", generations=2)
    front = pd.read_csv(run / "pareto.csv")
    points = front[["clean_acc", "pgd3_acc", "params"]].to_numpy().tolist()
    directions = (True, True, False)
    assert len(points) >= 1
    for a, b in combinations(points, 2):
        assert not dominates(a, b, directions) and not dominates(b, a, directions)
    ind = pd.read_csv(run / "individuals.csv")
    for a in points:  # and nobody evaluated dominates a front member
        assert not any(dominates(b, a, directions) for b in ind[["clean_acc", "pgd3_acc", "params"]].to_numpy().tolist())


# ------------------------------------------------------------------ audit
class Saturated(nn.Module):
    """A model built to mask gradients: logits x 1e4 saturate softmax, so cross-entropy gradients are 0."""

    def __init__(self, model):
        super().__init__()
        self.model, self.params, self.flops = model, model.params, model.flops

    def forward(self, x):
        return self.model(x) * 1e4


class _Fitness:
    def __init__(self, values):
        self.values = values


class _Ind:
    def __init__(self, values):
        self.fitness, self.meta = _Fitness(values), {"status": "ok", "reason": ""}


def test_audit_flags_a_gradient_masking_model_and_penalise_replaces_its_robustness(trained):
    model, s = trained
    masked = Saturated(model).eval()
    two = objs.parse("clean,fgsm")
    # the synthetic classes are far apart: at 8/255 nothing breaks them, at 32/255 PGD does
    m = objs.Measure(s.val_x, s.val_y, 32 / 255, 100, seed=1)
    clean, fgsm = objs.measure(two, masked, m)
    audit = objs.get("pgd20").measure(masked, m, {})
    honest_fgsm = objs.measure(two, model, m)[1]
    assert fgsm == pytest.approx(clean) and fgsm > honest_fgsm  # FGSM sees no gradient: masking "helps"
    assert audit == pytest.approx(objs.get("pgd20").measure(model, m, {}))  # the margin audit is not fooled
    assert fgsm - audit > 0.10
    flagged = _Ind((clean, fgsm))
    assert judge(flagged, AuditResult(audit), two, AuditSettings(threshold=0.10, mode="flag")) == (clean, fgsm)
    assert flagged.meta["masking"] is True and flagged.meta["audit_acc"] == audit
    penalised = _Ind((clean, fgsm))
    assert judge(penalised, AuditResult(audit), two, AuditSettings(threshold=0.10, mode="penalise")) == (clean, audit)
    assert "masking penalised" in penalised.meta["reason"]
    assert judge(_Ind((clean, audit + 0.05)), AuditResult(audit), two, AuditSettings(threshold=0.10)) == (
        clean, audit + 0.05)
    shattered = _Ind((clean, fgsm))  # a zero input gradient: no gradient attack measures it, penalised to 0
    assert judge(shattered, AuditResult(fgsm, 1.0), two, AuditSettings(mode="penalise")) == (clean, 0.0)
    assert shattered.meta["masking"] and "zero input gradient on 100%" in shattered.meta["reason"]


def test_audit_runs_on_the_bytes_workers_send_back(trained):
    model, s = trained
    blob = model_bytes(model, num_classes=10, in_shape=(3, 32, 32), mean=s.mean, std=s.std)
    ctx = EvalContext(grammar_path="unused", data="synthetic:400", val_size=100, device="cpu", eval_batch_size=100,
                      audit="pgd5")
    expected = objs.get("pgd5").measure(model, objs.Measure(s.val_x, s.val_y, 8 / 255, 100, seed=3), {})
    assert audit_remote((3, blob), ctx) == AuditResult(pytest.approx(expected), 0.0)
    sampled = EvalContext(**{**ctx.__dict__, "audit_n": 40})
    x, y = audit_sample(s, 40, sampled.split_seed)
    assert len(y) == 40 and len(set(y.tolist())) > 5  # a shuffle, not the first class of a sorted split
    assert torch.equal(audit_sample(s, 40, sampled.split_seed)[1], y)  # the same sample for every candidate
    assert audit_remote((3, blob), sampled).acc == pytest.approx(
        objs.get("pgd5").measure(model, objs.Measure(x, y, 8 / 255, 100, seed=3), {}))
    reason = audit_remote((3, b"not a model"), ctx)  # an audit that fails costs the flag, not the run
    assert isinstance(reason, str) and reason.startswith("audit failed")
    ind = _Ind((0.5, 0.4))
    assert judge(ind, reason, objs.parse("clean,fgsm"), AuditSettings()) == (0.5, 0.4)
    assert ind.meta["masking"] is False and "audit failed" in ind.meta["reason"]


def test_audits_go_out_costliest_first_and_each_lands_on_its_candidate():
    from nero_deap.search.audit import make_auditor
    from nero_deap.search.evolution import Constraint

    entrants = []
    for i, flops in enumerate([5, 900, 40, 7000, 0]):
        ind = _Ind((0.5, 0.4))
        ind.id, ind.meta["flops"] = i, flops
        entrants.append(ind)
    sent = []

    def recording_map(fn, jobs):
        jobs = list(jobs)
        sent.extend(seed for seed, _ in jobs)
        return [(AuditResult(0.1 * seed), 2.0) for seed, _ in jobs]  # accuracy from the seed: which went where

    audit = make_auditor(recording_map, None, objs.parse("clean,fgsm"), AuditSettings(), seed_of=lambda i: i)
    audit(entrants, Constraint(), {ind.id: b"model" for ind in entrants})
    assert sent == [3, 1, 2, 0, 4]  # by forward FLOPs, costliest first
    assert [ind.meta["audit_acc"] for ind in entrants] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_search_records_the_audit_of_every_archive_member(tmp_path):
    run, lines = search(tmp_path, "audited", audit="pgd5", masking="penalise")
    front, gens = pd.read_csv(run / "pareto.csv"), pd.read_csv(run / "gens.csv")
    ok = front[front.status == "ok"]
    assert len(ok) and ok.audit_acc.notna().all() and ok.masking.isin([True, False]).all()
    assert gens.flagged.iloc[-1] == int(front.masking.eq(True).sum())
    assert all("flagged for masking " in line and " evals/h" in line for line in lines if line.startswith("gen "))
    individuals = pd.read_csv(run / "individuals.csv")  # the audit's cost: per entrant and per generation
    audited = individuals[individuals.audit_acc.notna()]
    assert len(audited) and (audited.audit_s > 0).all() and individuals[individuals.audit_acc.isna()].audit_s.isna().all()
    assert audited.zero_grad.between(0, 1).all() and individuals[individuals.audit_acc.isna()].zero_grad.isna().all()
    per_gen = audited.groupby("gen").audit_s.sum()
    assert gens.set_index("gen").audit_s.reindex(per_gen.index).tolist() == pytest.approx(per_gen.tolist(), abs=0.01)
    assert (gens.train_s > 0).all() and (gens.evals_per_h > 0).all()


def test_evaluate_reproduces_a_runs_own_scores(tmp_path, capsys):
    run, _ = search(tmp_path, "ref", audit="none")
    ind = pd.read_csv(run / "individuals.csv")
    row = ind[ind.status == "ok"].iloc[-1]
    cfg = RunConfig(**{**RunConfig().__dict__, **{k: v for k, v in tomllib.loads(
        (run / "config.toml").read_text()).items()}})
    result = evaluate_architecture(read_phenotype(row.phenotype), cfg, individual_id=int(row.id))
    assert (result["clean"], result["fgsm"], result["params"]) == (row.clean_acc, row.fgsm_acc, row.params)
    reference = read_phenotype(str(ROOT / "grammars" / "reference" / "vgg-small.txt"))
    assert len(reference.layers) == 8
    assert main(["evaluate", row.phenotype, "--run", str(run), "--id", str(int(row.id)), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["clean"], printed["fgsm"]) == (row.clean_acc, row.fgsm_acc)
    assert main(["evaluate", "not a phenotype", "--run", str(run)]) == 2
    assert "architecture" in capsys.readouterr().err


# ------------------------------------------------------------------ random search
def test_random_search_writes_the_same_files_with_a_full_population_each_generation(tmp_path):
    run, _ = search(tmp_path, "random", algorithm="random", audit="none", generations=2)
    nsga, _ = search(tmp_path, "nsga", audit="none", generations=2)
    for name in ("config.toml", "gens.csv", "individuals.csv", "pareto.csv", "checkpoint.pkl"):
        assert (run / name).exists()
        if name.endswith(".csv"):
            assert list(pd.read_csv(run / name).columns) == list(pd.read_csv(nsga / name).columns)
    gens = pd.read_csv(run / "gens.csv")
    assert list(gens.nevals) == [4, 4, 4]
    ind = pd.read_csv(run / "individuals.csv")
    assert ind.id.is_unique and (ind.parents.isna()).all()  # fresh samples: no parents


# ------------------------------------------------------------------ tau
def test_kendall_tau_on_a_known_example():
    tau, p = kendall([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])  # 9 concordant pairs, 1 discordant
    assert tau == pytest.approx((9 - 1) / 10)
    assert p == pytest.approx(0.0833, abs=1e-3)  # exact two-sided p for n = 5, one swap
    search_rows = pd.DataFrame({"id": [1, 2, 3, 4], "clean_acc": [0.1, 0.2, 0.3, 0.4], "params": [40, 30, 20, 10]})
    final = pd.DataFrame({"arch": [1, 2, 3, 4], "clean": [0.5, 0.6, 0.7, 0.8], "fgsm": [0.4, 0.3, 0.2, 0.1],
                          "pgd": [0.1, 0.1, 0.1, 0.1], "autoattack": [float("nan")] * 4,
                          "params": [40, 30, 20, 10], "flops": [9, 9, 9, 9]})  # as final.csv has them too
    table = agreement_table(search_rows, final, objs.parse("clean,params")).set_index(["objective", "metric"])
    assert table.loc[("clean", "clean"), "tau"] == pytest.approx(1.0)
    assert table.loc[("clean", "fgsm"), "tau"] == pytest.approx(-1.0)
    assert table.loc[("params", "clean"), "tau"] == pytest.approx(1.0)  # smaller is better: sign flipped
    assert table.loc[("clean", "autoattack"), "n"] == 0


# ------------------------------------------------------------------ old runs
def test_a_run_from_before_the_registry_resumes_and_reports(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-v1", old)
    before = pd.read_csv(old / "individuals.csv", dtype=str)
    proc = resume_run(old, 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed after generation 1" in proc.stdout
    gens, ind = pd.read_csv(old / "gens.csv"), pd.read_csv(old / "individuals.csv", dtype=str)
    assert list(gens.gen) == [0, 1, 2] and {"flagged", "stopped", "audit_s"} <= set(gens.columns)
    assert "fidelity" in ind.columns and (ind.fidelity.astype(float).dropna() == 1).all()
    pd.testing.assert_frame_equal(ind.iloc[:len(before)][before.columns].drop(columns="train_s"),
                                  before.drop(columns="train_s"))
    write_report([old], tmp_path / "report", echo=lambda *a: None)
    table = summary_table([load_run(old)])  # the old rows (fidelity empty since the resume) count as complete
    assert table.stopped.iloc[0] == 0 and table.best_fgsm.iloc[0] == pd.to_numeric(ind.fgsm_acc).max()
    assert (tmp_path / "report" / "objectives.png").exists()


def test_report_leaves_unfinished_and_failed_runs_out_of_the_seeds(tmp_path):
    """An all-failed run stopped at generation 0 once counted as a seed with hypervolume 0 and its failed
    candidates as a front; runs of other grammars were pooled as seeds without a word."""
    from nero_deap.commands.report import group_table, load_run, setting_differences

    def variant(name, config_edit=None, failed=False):
        run = tmp_path / name
        shutil.copytree(ROOT / "tests" / "fixtures" / "run-v1", run)
        if config_edit:
            text = (run / "config.toml").read_text()
            (run / "config.toml").write_text(text.replace(*config_edit))
        if failed:
            for table in ("individuals.csv", "pareto.csv"):
                frame = pd.read_csv(run / table)
                frame["status"] = "error"
                frame.to_csv(run / table, index=False)
        return load_run(run)

    runs = [variant("a"), variant("b", ("seed = 0", "seed = 1")), variant("c", ("generations = 1", "generations = 5")),
            variant("d", failed=True)]
    table = summary_table(runs).set_index("run")
    assert list(table.state) == ["finished", "finished", "stopped at gen 1 of 5", "all failed"]
    assert table.front_size.d == 0 and table.front_size.a > 0
    groups = group_table(runs).iloc[0]
    assert (groups.runs, groups.left_out) == (2, 2)
    assert setting_differences(runs) == []
    other = variant("e", ('grammar = "tests/tiny.grammar"', 'grammar = "grammars/cnn.grammar"'))
    assert setting_differences(runs + [other]) == [
        "warning: the runs of group 'nsga2 on clean,fgsm' differ in grammar: their spread is not a spread over seeds"]
