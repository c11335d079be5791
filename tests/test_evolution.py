"""The search end to end: outputs, determinism, kill-and-resume, SCOOP, bad input."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from deap import creator

from conftest import CIFAR_ZIP, ROOT, TINY_GRAMMAR, run_cli, without_timing
from nero_deap.cli import main
from nero_deap.search.objectives import hypervolume, parse

TIMING = ["train_s", "wall_s"]
BASE = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic", "--population", "8", "--epochs", "1",
        "--threads", "1", "--seed", "3"]


def frames(run_dir):
    ind = without_timing(pd.read_csv(run_dir / "individuals.csv"))
    gens = without_timing(pd.read_csv(run_dir / "gens.csv"))
    return ind, gens


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    proc = run_cli(BASE + ["--generations", "3", "--out", str(out)])
    return out, proc


def test_end_to_end_outputs_agree(reference_run):
    out, proc = reference_run
    for name in ("config.toml", "gens.csv", "individuals.csv", "pareto.csv", "checkpoint.pkl"):
        assert (out / name).exists(), name
    ind, gens = frames(out)
    pareto = pd.read_csv(out / "pareto.csv")
    assert list(gens.gen) == [0, 1, 2, 3]
    assert gens.nevals.sum() == len(ind)
    assert ind.id.is_unique and ind.clean_acc.between(0, 1).all() and ind.fgsm_acc.between(0, 1).all()
    assert set(pareto.id) <= set(ind.id)
    points = list(zip(pareto.clean_acc, pareto.fgsm_acc))
    for a in points:  # nobody on the front is dominated by anyone on it
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points)
    best = max(zip(ind.clean_acc, ind.fgsm_acc), key=lambda p: p[0])
    assert any(p[0] >= best[0] for p in points)
    assert gens.hypervolume.is_monotonic_increasing
    assert gens.hypervolume.iloc[-1] == pytest.approx(hypervolume(points, parse("clean,fgsm")))
    assert "gen   3/3" in proc.stdout


def front_weight_ids(run_dir):
    return {int(path.stem) for path in (run_dir / "weights").glob("*.pt")}


def test_front_weights_reproduce_the_search_scores(reference_run):
    """The weights kept are exactly the front's, and they score what the search logged."""
    import torch

    from nero_deap import load_model
    from nero_deap.engine.attacks import accuracy_clean_fgsm
    from nero_deap.engine.datasets import load_raw
    from nero_deap.engine.data import make_splits

    out, _ = reference_run
    pareto = pd.read_csv(out / "pareto.csv")
    assert front_weight_ids(out) == set(pareto[pareto.status == "ok"].id) and len(pareto) > 0
    splits = make_splits(load_raw("synthetic"))  # the run's data and default validation split
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run (--threads 1): same float sums
    try:
        for row in pareto.itertuples():
            model = load_model(out / "weights" / f"{row.id}.pt")
            assert model.phenotype_text == row.phenotype and not model.training
            scores = accuracy_clean_fgsm(model, splits.val_x, splits.val_y)
            assert scores == pytest.approx((row.clean_acc, row.fgsm_acc), abs=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_same_seed_same_individuals(reference_run, tmp_path):
    out, _ = reference_run
    run_cli(BASE + ["--generations", "3", "--out", str(tmp_path / "again")])
    a, b = frames(out), frames(tmp_path / "again")
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


def test_sigkill_then_resume_matches_uninterrupted(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "run.py")] + BASE + ["--generations", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once generation 1 is checkpointed
        if (out / "gens.csv").exists() and len((out / "gens.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    killed_early = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_early, "the run finished before it could be killed"
    assert len(pd.read_csv(out / "gens.csv")) < 4
    resumed = run_cli(["--resume", str(out), "--threads", "1"])
    assert "resumed after generation" in resumed.stdout
    for got, want in zip(frames(out), frames(ref)):
        pd.testing.assert_frame_equal(got, want)
    assert front_weight_ids(out) == front_weight_ids(ref)  # orphans of the killed generation are gone
    assert not list((out / "weights").glob(".*"))  # no half-written temporary files


def test_resume_can_extend_generations(reference_run, tmp_path):
    import shutil

    ref, _ = reference_run
    out = tmp_path / "extended"
    shutil.copytree(ref, out)
    run_cli(["--resume", str(out), "--generations", "4", "--threads", "1", "--save-weights", "all"])
    assert list(pd.read_csv(out / "gens.csv").gen) == [0, 1, 2, 3, 4]
    ind = pd.read_csv(out / "individuals.csv")
    new = set(ind[(ind.gen == 4) & (ind.status == "ok")].id)
    assert new and new <= front_weight_ids(out)  # "all" keeps dominated newcomers too
    assert front_weight_ids(ref) <= front_weight_ids(out)


def test_scoop_matches_serial(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "scoop"
    run_cli(BASE + ["--generations", "3", "--out", str(out)], scoop=True)
    for got, want in zip(frames(out), frames(ref)):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("args, expected", [
    (["--population", "6"], "multiple of 4"),
    (["--data", "/no/such/data.zip"], "no such file"),
    (["--epochs", "0"], "epochs must be > 0"),
    (["--device", "tpu"], "device must be"),
    (["--set", "save_weights=best"], "save_weights must be one of front, all, none"),
    (["--set", "accelerate=yes"], "accelerate must be one of auto, on, off"),
])
def test_bad_input_exits_2_with_one_line(args, expected, capsys, tmp_path):
    assert main(BASE + ["--out", str(tmp_path / "x")] + args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_grammar_reports_file_line_col(capsys, tmp_path):
    bad = tmp_path / "bad.grammar"
    bad.write_text("<features> ::= layer:conv\n<classification> ::= <nope>\n")
    assert main(["--grammar", str(bad), "--data", "synthetic"]) == 2
    assert capsys.readouterr().err.strip() == f"{bad}:2:22: undefined non-terminal <nope>"


def test_bad_grammar_through_the_real_cli(tmp_path):
    bad = tmp_path / "bad.grammar"
    bad.write_text("<features> ::= [n,int,1,5,2]\n")
    proc = run_cli(["--grammar", str(bad), "--data", "synthetic"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"{bad}:1:16: malformed range '[n,int,1,5,2]': min 5 > max 2"


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('populaton = 8\n')
    assert main(BASE + ["--config", str(cfg)]) == 2
    assert "unknown key 'populaton'" in capsys.readouterr().err
    cfg.write_text('[structure]\nmodules = [["features", 1]]\n')
    assert main(BASE + ["--config", str(cfg)]) == 2
    assert "must be [name, min, max]" in capsys.readouterr().err


@pytest.mark.parametrize("line, expected", [
    ("population = true", "population must be a whole number, got True"),
    ('population = "8"', "population must be a whole number, got '8'"),
    ("epochs = true", "epochs must be float, got True"),
    ('out = ["a"]', "out must be str, got ['a']"),
    ("population = 8.5", "population must be a whole number, got 8.5"),
    ("cxpb = 1.5", "cxpb must be in [0, 1], got 1.5"),
    ("eps = 2.0", "eps must be in [0, 1], got 2.0"),
    ("workers_per_gpu = 100000", "workers_per_gpu must be in [1, 1024], got 100000"),
    ("generations = 1000000000", "generations must be in [0, 1000000], got 1000000000"),
    ('fidelity = "quarter"', "fidelity must be one of full, halving, got 'quarter'"),
    ('audit = "clean"', "audit must be a robustness objective such as pgd20, or none, got 'clean'"),
    ('device = "gpu"', "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("[structure]\nmax_depth = 100000", "structure.max_depth must be in [1, 256], got 100000"),
    ('[structure]\nmodules = [["features", 3, 2]]', "structure module <features>: need 1 <= min (3) <= max (2)"),
    ("[variation]\nadd_layer = 7", "variation.add_layer = 7.0 must lie in [0, 1]"),
])
def test_config_values_are_taken_as_typed_not_converted(capsys, tmp_path, line, expected):
    """Conversions once made true a population of 1, "8" a number and ['a'] a folder named "['a']".
    Every error names the file; a bad [structure] value once named the grammar file instead."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(line + "\n")
    assert main(BASE + ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {cfg}: {expected}", err


def test_a_value_set_on_the_command_line_is_not_blamed_on_the_config_file(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("population = 8\n[structure]\nmax_depth = 10\n")
    assert main(BASE + ["--config", str(cfg), "--population", "6"]) == 2
    assert capsys.readouterr().err.strip() == "error: population must be a positive multiple of 4 " \
                                              "(NSGA-II's selTournamentDCD), at most 65536, got 6"
    assert main(BASE + ["--config", str(cfg), "--set", "structure.max_depth=1000"]) == 2
    assert capsys.readouterr().err.strip() == "error: structure.max_depth must be in [1, 256], got 1000"
    cfg.write_text("[structure]\nmax_depth = 100000\n")  # the file's value, beside another key of its table
    assert main(BASE + ["--config", str(cfg), "--set", "structure.levels_back.features=1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {cfg}: structure.max_depth must be in [1, 256], got 100000"


def test_set_on_the_command_line_converts_what_the_shell_gives():
    from nero_deap.store.config import ConfigError, RunConfig, merge, parse_set

    cfg = merge(RunConfig(), parse_set(["min_clean=.5", "epochs=1.", "out=2024", "population=8.0"]), "command line")
    assert (cfg.min_clean, cfg.epochs, cfg.out, cfg.population) == (0.5, 1.0, "2024", 8)
    for bad in ("population=true", "population=8.5", "epochs=abc"):
        with pytest.raises(ConfigError):
            merge(RunConfig(), parse_set([bad]), "command line")


def test_existing_run_is_not_overwritten(reference_run, capsys):
    out, _ = reference_run
    assert main(BASE + ["--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_constrained_domination():
    a, b, c = creator.FitnessMulti(), creator.FitnessMulti(), creator.FitnessMulti()
    a.values, b.values, c.values = (0.6, 0.1), (0.4, 0.9), (0.3, 0.95)
    assert not a.dominates(b) and not b.dominates(a)
    a.violation, b.violation, c.violation = 0.0, 0.1, 0.2  # tau = 0.5: b and c infeasible
    assert a.dominates(b) and b.dominates(c) and not c.dominates(a)
    import copy

    assert copy.deepcopy(b).violation == 0.1


def test_hypervolume_of_two_accuracies_is_the_dominated_area():
    two = parse("clean,fgsm")
    assert hypervolume([(0.5, 0.5)], two) == pytest.approx(0.25)
    assert hypervolume([(0.8, 0.2), (0.4, 0.6), (0.3, 0.1)], two) == pytest.approx(0.8 * 0.2 + 0.4 * 0.4)
    assert hypervolume([], two) == 0.0


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="set NERO_DEAP_CIFAR10_ZIP to the CIFAR-10 JPEG zip to run this test")
def test_real_cifar_zip_smoke(tmp_path):
    out = tmp_path / "cifar"
    run_cli(["--grammar", str(TINY_GRAMMAR), "--data", str(CIFAR_ZIP), "--population", "4", "--generations", "1",
             "--epochs", "1", "--train-subset", "300", "--val-size", "200", "--out", str(out)])
    ind = pd.read_csv(out / "individuals.csv")
    assert len(ind) >= 4 and (ind.status == "ok").all() and ind.clean_acc.between(0, 1).all()


def test_set_overrides_nested_config(tmp_path):
    from nero_deap.store.config import parse_set

    assert parse_set(["structure.levels_back.features=3", "variation.add_connection=0.2", "data=synthetic"]) == {
        "structure": {"levels_back": {"features": 3}}, "variation": {"add_connection": 0.2}, "data": "synthetic"}
    out = tmp_path / "set"
    assert main(BASE + ["--generations", "0", "--out", str(out), "--set", "structure.levels_back.features=3",
                        "--set", 'structure.modules=[["features", 1, 4], ["classification", 1, 2]]']) == 0
    import tomllib

    saved = tomllib.loads((out / "config.toml").read_text())["structure"]
    assert saved["levels_back"]["features"] == 3 and saved["modules"][0] == ["features", 1, 4]


def test_set_rejects_unknown_keys(capsys):
    assert main(BASE + ["--set", "structure.bogus=1"]) == 2
    assert "unknown [structure] key(s): bogus" in capsys.readouterr().err


def test_unseen_dialect_grammar_with_bom_runs(tmp_path, capsys):
    grammar = tmp_path / "bom.grammar"
    grammar.write_bytes(b"\xef\xbb\xbf" + (ROOT / "tests" / "variant.grammar").read_bytes())
    out = tmp_path / "variant"
    assert main(["--grammar", str(grammar), "--data", "synthetic", "--population", "4", "--generations", "1",
                 "--epochs", "1", "--threads", "1", "--out", str(out)]) == 0
    assert "using <output> as the output rule" in capsys.readouterr().out
    ind = pd.read_csv(out / "individuals.csv")
    assert (ind.status == "ok").all() and ind.phenotype.str.contains("layer:output").all()


def test_evaluations_go_out_costliest_first_and_each_result_reaches_its_candidate():
    """A parallel map ends with its slowest worker: the costliest evaluations (forward FLOPs) go out first,
    and every result, with its extra arguments, still lands on its own candidate."""
    import random

    from deap import tools

    from nero_deap.commands import search
    from nero_deap.store.config import RunConfig
    from nero_deap.search.evolution import SearchState, evaluate_mapped, initial_population, make_toolbox
    from nero_deap.space.genotype import to_phenotype
    from nero_deap.nets.network import planned_flops

    grammar, structure, rates = search.load_search_space(RunConfig(grammar=str(TINY_GRAMMAR)), echo=lambda _: None)
    toolbox = make_toolbox(grammar, structure, rates, lambda ind: None, rng=random.Random(5))
    population = initial_population(toolbox, 12, SearchState([], tools.ParetoFront()))
    sent = []

    def recording_map(fn, *columns):
        calls = list(zip(*columns))
        sent.extend(planned_flops(to_phenotype(args[0], grammar, structure)) for args in calls)
        return (fn(*args) for args in calls)

    def fake_evaluation(ind, tag):
        return (ind.id / 100, tag / 1000), {"status": "ok", "tag": tag}

    toolbox.register("map", recording_map)
    evaluate_mapped(fake_evaluation, population, ([ind.id * 7 for ind in population],), toolbox)
    assert sent == sorted(sent, reverse=True) and len(set(sent)) > 3  # costliest first, and costs differ
    assert all(ind.fitness.values == (ind.id / 100, ind.id * 7 / 1000) and ind.meta["tag"] == ind.id * 7
               for ind in population)
