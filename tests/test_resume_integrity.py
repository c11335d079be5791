"""Resume integrity: refused overrides, corrupt checkpoints, temp files, weights kept out of checkpoints,
no duplicate phenotypes.  A stand-in evaluation (a hash of the phenotype, no training) keeps these fast."""
import hashlib
import pickle
import random
import shutil

import pandas as pd
import pytest

from conftest import ROOT, TINY_GRAMMAR, without_timing
from nero_deap.commands import search
from nero_deap.cli import main
from nero_deap.search.fitness import grammar_and_structure
from nero_deap.space.genotype import to_phenotype
from nero_deap.store.logbook import load_checkpoint

BASE = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--population", "8", "--epochs", "1",
        "--threads", "1", "--seed", "5"]


def hashed_fitness(text: str) -> tuple:
    """Two objectives in [0,1] that depend on the phenotype only, as a deterministic evaluation would."""
    digest = hashlib.sha256(text.encode()).digest()
    clean = digest[0] / 255
    return clean, clean * digest[1] / 255


def fake_meta(weight_bytes: int = 0) -> dict:
    meta = {"params": 1, "flops": 1, "epochs": 1.0, "train_s": 0.0, "status": "ok", "reason": "", "eval_s": 0.0}
    if weight_bytes:
        meta["weights"] = b"w" * weight_bytes
    return meta


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Replace training by :func:`hashed_fitness`; ``weights.size`` sets the bytes each candidate returns."""
    class Weights:
        size = 64

    def evaluate(individual, ctx):
        grammar, structure = grammar_and_structure(ctx)
        text = to_phenotype(individual, grammar, structure).to_text()
        return hashed_fitness(text), fake_meta(Weights.size if ctx.return_weights else 0)

    monkeypatch.setattr(search, "evaluate_remote", evaluate)
    return Weights


def frames(run_dir):
    return [without_timing(pd.read_csv(run_dir / name)) for name in ("individuals.csv", "gens.csv", "pareto.csv")]


def assert_same_run(got, want):
    for a, b in zip(frames(got), frames(want)):
        pd.testing.assert_frame_equal(a, b)
    assert {p.name for p in (got / "weights").glob("*.pt")} == {p.name for p in (want / "weights").glob("*.pt")}


@pytest.fixture
def runs(tmp_path, fake_evaluate):
    """A finished 3-generation run and a copy of it stopped after generation 2 (both with the fake evaluation)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(BASE + ["--generations", "3", "--out", str(full)]) == 0
    assert main(BASE + ["--generations", "2", "--out", str(part)]) == 0
    return full, part


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 7: overrides on resume
@pytest.mark.parametrize("args, named", [
    (["--seed", "99"], "seed (5 -> 99)"),
    (["--population", "12"], "population (8 -> 12)"),
    (["--grammar", str(ROOT / "tests" / "variant.grammar")], "grammar ("),
    (["--epochs", "2"], "epochs (1.0 -> 2.0)"),
    (["--accelerate", "on"], "accelerate ('auto' -> 'on')"),
    (["--set", "structure.max_depth=4"], "structure.max_depth (10 -> 4)"),
])
def test_resume_refuses_changes_that_change_the_run(runs, args, named, capsys):
    _, part = runs
    config = (part / "config.toml").read_bytes()
    assert main(["--resume", str(part), "--generations", "3"] + args) == 2
    err = one_error_line(capsys)
    assert named in err and str(part) in err
    assert (part / "config.toml").read_bytes() == config
    assert len(pd.read_csv(part / "gens.csv")) == 3


def test_resume_accepts_machine_keys_and_more_generations(runs, capsys):
    full, part = runs
    assert main(["--resume", str(part), "--generations", "3", "--device", "cpu", "--threads", "2",
                 "--workers-per-gpu", "2", "--save-weights", "front"]) == 0
    assert "resumed after generation 2" in capsys.readouterr().out
    assert_same_run(part, full)
    assert 'generations = 3' in (part / "config.toml").read_text()


# ------------------------------------------------------------------ 8: corrupt checkpoints
def test_corrupt_newest_checkpoint_falls_back_to_previous(runs, capsys):
    full, part = runs
    newest = part / "checkpoint.pkl"
    assert load_checkpoint(part / "checkpoint.prev.pkl")["gen"] == 1
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    assert main(["--resume", str(part), "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "truncated or corrupt checkpoint" in out and "resuming from checkpoint.prev.pkl (generation 1)" in out
    assert_same_run(part, full)  # CSVs cut back to generation 1, then regrown identically
    assert load_checkpoint(newest)["gen"] == 3 and load_checkpoint(part / "checkpoint.prev.pkl")["gen"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not-a-dict"])
def test_unreadable_checkpoint_is_one_line_and_exit_2(runs, damage, capsys):
    _, part = runs
    (part / "checkpoint.prev.pkl").unlink()
    newest = part / "checkpoint.pkl"
    newest.write_bytes({"truncate": newest.read_bytes()[:100], "garbage": b"\x80\x05garbage" * 50, "empty": b"",
                        "not-a-dict": pickle.dumps([1, 2, 3])}[damage])
    config = (part / "config.toml").read_bytes()
    assert main(["--resume", str(part), "--generations", "4"]) == 2  # --generations would be written to config.toml
    err = one_error_line(capsys)
    assert err.startswith(f"error: {newest}: ")
    assert (part / "config.toml").read_bytes() == config


@pytest.mark.parametrize("key, value", [("gen", -5), ("gen", "2"), ("next_id", True), ("population", {}),
                                        ("rng", [])])
def test_a_checkpoint_with_values_of_the_wrong_kind_is_one_line(runs, key, value, capsys):
    _, part = runs
    (part / "checkpoint.prev.pkl").unlink()
    state = load_checkpoint(part / "checkpoint.pkl")
    state[key] = value
    (part / "checkpoint.pkl").write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    assert main(["--resume", str(part), "--generations", "3"]) == 2
    assert f"not a nero-deap checkpoint ({key} of the wrong type or range)" in one_error_line(capsys)


def test_both_checkpoints_corrupt_names_the_newest(runs, capsys):
    _, part = runs
    for name in ("checkpoint.pkl", "checkpoint.prev.pkl"):
        (part / name).write_bytes(b"\x80\x05")
    assert main(["--resume", str(part)]) == 2
    assert f"{part / 'checkpoint.pkl'}: truncated or corrupt checkpoint" in one_error_line(capsys)


def test_checkpoint_written_before_rng_states_were_plain_values_still_resumes(runs):
    """Checkpoints of earlier versions hold numpy and torch objects for the RNG states; they still load and resume."""
    import numpy as np
    import torch

    full, part = runs
    state = load_checkpoint(part / "checkpoint.pkl")
    kind, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), *rest)
    state["rng"]["torch"] = torch.frombuffer(bytearray(state["rng"]["torch"]), dtype=torch.uint8).clone()
    for ind in state["archive"]:  # the Pareto archive's deep copies kept the weights
        ind.meta["weights"] = b"w" * 5000
    (part / "checkpoint.pkl").write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    assert isinstance(load_checkpoint(part / "checkpoint.pkl")["rng"]["torch"], torch.Tensor)
    assert main(["--resume", str(part), "--generations", "3"]) == 0
    assert_same_run(part, full)
    assert not any("weights" in ind.meta for ind in load_checkpoint(part / "checkpoint.pkl")["archive"])


# ------------------------------------------------------------------ 9: temp files of a killed atomic write
def test_resume_removes_temp_files_of_killed_writes(runs, capsys):
    full, part = runs
    leftovers = [part / ".checkpoint.pkl.xta81a1d", part / ".pareto.csv.k2j_h4g5", part / ".config.toml.abcdefgh",
                 part / "weights" / ".16.pt.q0w9e8r7"]
    kept = [part / ".keep", part / "weights" / ".notes.txt.abcdefgh"]  # not names our writes use
    for path in leftovers + kept:
        path.write_bytes(b"x" * 1000)
    assert main(["--resume", str(part), "--generations", "3"]) == 0
    assert "removed 4 temporary file(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)
    assert_same_run(part, full)


def test_resume_drops_half_written_csv_rows(runs, capsys):
    """A kill or a full disk in the middle of an append leaves part of a row; resume once kept it as a row."""
    full, part = runs
    with open(part / "individuals.csv", "a") as f:
        f.write("1")  # the first field of a row, no newline
    with open(part / "gens.csv", "a") as f:
        f.write("x,3,0.5\n")  # a row cut short, with a gen that is not a number
    assert main(["--resume", str(part), "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "individuals.csv: dropped 1 incomplete row(s)" in out and "gens.csv: dropped 1 incomplete row(s)" in out
    assert_same_run(part, full)


# ------------------------------------------------------------------ 10: no weights in checkpoints
def test_checkpoint_size_does_not_grow_with_model_size(tmp_path, fake_evaluate):
    sizes = {}
    for weight_bytes in (100, 300_000):
        fake_evaluate.size = weight_bytes
        out = tmp_path / f"w{weight_bytes}"
        assert main(BASE + ["--generations", "2", "--out", str(out)]) == 0
        files = list((out / "weights").glob("*.pt"))
        assert files and all(f.stat().st_size == weight_bytes for f in files)  # the weights still reach their files
        sizes[weight_bytes] = [(out / name).stat().st_size for name in ("checkpoint.pkl", "checkpoint.prev.pkl")]
        state = load_checkpoint(out / "checkpoint.pkl")
        assert all("weights" not in ind.meta for ind in list(state["archive"]) + state["population"])
    assert sizes[100] == sizes[300_000]


# ------------------------------------------------------------------ 11: no duplicate phenotypes
def test_population_never_holds_a_phenotype_or_id_twice():
    from deap import tools

    from nero_deap.store.config import RunConfig
    from nero_deap.search.evolution import SearchState, evaluate_invalid, initial_population, make_toolbox, nsga2_generation

    grammar, structure, rates = search.load_search_space(RunConfig(grammar=str(TINY_GRAMMAR)), echo=lambda _: None)
    rng = random.Random(7)
    toolbox = make_toolbox(grammar, structure, rates, lambda ind: None, rng=rng)
    toolbox.register("evaluate", lambda ind: (hashed_fitness(toolbox.phenotype_text(ind)), fake_meta()))
    mu, state = 20, SearchState([], tools.ParetoFront())
    state.population = initial_population(toolbox, mu, state)
    evaluate_invalid(state.population, toolbox)
    state.population = toolbox.select(state.population, mu)
    for _ in range(10):
        nsga2_generation(state, toolbox, cxpb=0.5, mutpb=1.0, rng=rng)
        ids = [ind.id for ind in state.population]
        texts = [toolbox.phenotype_text(ind) for ind in state.population]
        assert len(state.population) == mu and len(set(ids)) == mu and len(set(texts)) == mu


def test_initial_population_redraws_duplicates_and_copes_with_a_tiny_space(tmp_path):
    from deap import tools

    from nero_deap.store.config import RunConfig
    from nero_deap.search.evolution import SearchState, initial_population, make_toolbox

    one = tmp_path / "one.grammar"  # a search space of exactly two networks
    one.write_text("<features> ::= layer:conv num-filters:4 filter-shape:3 | layer:pool-max kernel-size:2\n"
                   "<classification> ::= layer:fc num-units:8\n<softmax> ::= layer:fc act:softmax num-units:10\n"
                   "<learning> ::= learning:adam lr:0.001 batch_size:32\n")
    cfg = RunConfig(grammar=str(one), structure={"modules": [["features", 1, 1], ["classification", 1, 1]],
                                                  "init": {"features": [1], "classification": [1]}})
    grammar, structure, rates = search.load_search_space(cfg, echo=lambda _: None)
    toolbox = make_toolbox(grammar, structure, rates, lambda ind: None, rng=random.Random(0))
    state = SearchState([], tools.ParetoFront())
    population = initial_population(toolbox, 4, state, max_draws_per_slot=5)
    texts = [toolbox.phenotype_text(ind) for ind in population]
    assert len(population) == 4 and len(set(texts)) == 2 and len({ind.id for ind in population}) == 4
    assert len(set(texts[:2])) == 2  # the two networks come first: duplicates were redrawn while draws remained
