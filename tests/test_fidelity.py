"""--fidelity halving: a paused training goes on exactly; stopped candidates never win.

The exactness tests compare every tensor of the model (weights and BatchNorm
statistics) after an uninterrupted training with the same training paused and
continued on a freshly built model, as a halving search does it on another
worker: bit for bit on the CPU in float32.
"""
from dataclasses import replace

import pandas as pd
import pytest
import torch

from conftest import TINY_GRAMMAR, run_cli, without_timing
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.data import make_splits
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.engine.train import TrainSettings, train

NET = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu batch-norm:True input:-1 | "
       "layer:dropout rate:0.3 input:0 | "
       "layer:pool-max kernel-size:2 stride:2 input:1 | "
       "layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:2 | "
       "layer:fc num-units:10 act:softmax input:3 || ")
LEARNING = {"adam": "learning:adam lr:0.003 batch_size:32",
            "sgd": "learning:gradient-descent lr:0.05 momentum:0.9 nesterov:True decay:0.0005 batch_size:32"}


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(1)
    return make_splits(load_raw("synthetic"))


def fresh(splits, learning: str):
    phenotype = Phenotype.from_text(NET + LEARNING[learning])
    torch.manual_seed(7)
    return build_network(phenotype, mean=splits.mean, std=splits.std), phenotype.learning


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("learning,n,pause_at,extra", [
    ("adam", 480, 1 / 3, {}),   # mid-epoch
    ("sgd", 480, 0.5, {}),      # an epoch boundary (2 epochs of 15 steps, paused after 15)
    ("adam", 449, 0.5, {}),     # 449 = 14 x 32 + 1: paused right before the skipped batch of one image
    ("sgd", 480, 0.4, {"accelerate": True, "adv": "fgsm-rs"}),  # bf16 + channels_last, attack draws too
])
def test_a_paused_training_continues_exactly(splits, learning, n, pause_at, extra):
    x, y = splits.train_x[:n], splits.train_y[:n]
    settings = TrainSettings(epochs=2, seed=5, **{"accelerate": False, **extra})
    model, learn = fresh(splits, learning)
    whole = train(model, learn, x, y, settings)
    want = weights(model)
    assert whole.snapshot is None and whole.budget_fraction == 1.0

    model, learn = fresh(splits, learning)
    first = train(model, learn, x, y, replace(settings, pause_at=pause_at))
    assert first.snapshot is not None and 0 < first.steps < whole.steps
    assert first.budget_fraction == pytest.approx(first.steps / whole.steps)
    model.eval()  # scored in between, as the search does: the global RNG moves on
    torch.manual_seed(123)
    model(x[:8].float() / 255)

    model, learn = fresh(splits, learning)  # another process: a newly built network
    rest = train(model, learn, x, y, settings, resume=first.snapshot)
    assert rest.steps == whole.steps and rest.snapshot is None
    got = weights(model)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_the_time_cap_wins_over_the_pause(splits):
    """As in an uninterrupted run, a training past its time cap stops there, complete, without a snapshot."""
    model, learn = fresh(splits, "adam")
    result = train(model, learn, splits.train_x, splits.train_y,
                   TrainSettings(epochs=2, seed=1, accelerate=False, max_seconds=1e-9, pause_at=0.5))
    assert result.capped and result.steps == 1 and result.snapshot is None and result.budget_fraction == 1.0


def test_a_snapshot_is_plain_data(splits):
    import io

    model, learn = fresh(splits, "adam")
    blob = train(model, learn, splits.train_x, splits.train_y,
                 TrainSettings(epochs=1, seed=1, accelerate=False, pause_at=0.5)).snapshot
    torch.load(io.BytesIO(blob), weights_only=True)  # no code runs when it is read
    with pytest.raises(ValueError, match="not a training snapshot"):
        train(model, learn, splits.train_x, splits.train_y, TrainSettings(epochs=1),
              resume=_saved({"model": {}}))


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------ the search
FAST = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:240", "--val-size", "60", "--population", "8",
        "--epochs", "2", "--threads", "1", "--seed", "4", "--accelerate", "off", "--audit", "pgd3"]
HALVING = ["--fidelity", "halving", "--halving-budget", "0.34", "--halving-keep", "0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain and a halving search of two generations, same seed."""
    root = tmp_path_factory.mktemp("fidelity")
    run_cli(FAST + ["--generations", "2", "--out", str(root / "full")])
    proc = run_cli(FAST + HALVING + ["--generations", "2", "--save-weights", "all", "--out", str(root / "halving")])
    return root, proc.stdout


def test_halving_stops_some_and_never_archives_them(runs):
    root, stdout = runs
    ind = pd.read_csv(root / "halving" / "individuals.csv")
    front = pd.read_csv(root / "halving" / "pareto.csv")
    gens = pd.read_csv(root / "halving" / "gens.csv")
    stopped = ind[ind.fidelity < 1]
    assert len(stopped) and (stopped.fidelity > 0.3).all() and (stopped.fidelity < 0.4).all()
    assert list(gens.stopped) == [int((ind[ind.gen == g].fidelity < 1).sum()) for g in gens.gen]
    for gen, rows in ind.groupby("gen"):  # half of those that paused went on (failures are complete at once)
        paused = rows[(rows.fidelity < 1) | (rows.train_s > 0) & (rows.status == "ok")]
        assert (rows.fidelity < 1).sum() == len(paused) - -(-len(paused) // 2), gen
    assert (front.fidelity == 1).all() and not set(front.id) & set(stopped.id)
    assert front.audit_acc.notna().all() and stopped.audit_acc.isna().all()  # only complete entrants are audited
    weights = {int(p.stem) for p in (root / "halving" / "weights").glob("*.pt")}
    assert weights and not weights & set(stopped.id)
    assert all(" stopped " in line for line in stdout.splitlines() if line.startswith("gen "))
    saved = (root / "halving" / "checkpoint.pkl").read_bytes()
    assert b"snapshot" not in saved  # snapshots live only inside a generation, never in checkpoints
    complete = ind[ind.fidelity == 1]
    for gen, row in gens.set_index("gen").iterrows():  # the population's bests come from complete candidates
        assert row.fgsm_max <= complete[complete.gen <= gen].fgsm_acc.max()


def test_continued_candidates_score_as_if_trained_in_one_go(runs):
    """Generation 0 draws the same genotypes in both runs: a continued candidate equals the plain run's."""
    root, _ = runs
    full = pd.read_csv(root / "full" / "individuals.csv").set_index("id")
    halving = pd.read_csv(root / "halving" / "individuals.csv").set_index("id")
    continued = halving[(halving.gen == 0) & (halving.fidelity == 1) & (halving.status == "ok")]
    assert len(continued)
    for column in ("phenotype", "clean_acc", "fgsm_acc", "status"):
        assert continued[column].tolist() == full.loc[continued.index, column].tolist(), column


def test_every_complete_candidate_dominates_a_stopped_one():
    from types import SimpleNamespace

    from deap import creator, tools

    from nero_deap.search.evolution import Constraint, set_fitness, use_objectives
    from nero_deap.search.objectives import parse

    use_objectives(parse("clean,fgsm"))
    constraint = Constraint(index=0, tau=0.3)
    complete_infeasible, stopped = (SimpleNamespace(fitness=creator.FitnessMulti()) for _ in range(2))
    set_fitness(complete_infeasible, (0.1, 0.05), {"fidelity": 1.0}, constraint)
    set_fitness(stopped, (0.9, 0.8), {"fidelity": 0.34}, constraint)
    assert complete_infeasible.fitness.dominates(stopped.fitness)
    assert not stopped.fitness.dominates(complete_infeasible.fitness)
    failed = SimpleNamespace(fitness=creator.FitnessMulti())
    set_fitness(failed, (0.0, 0.0), {"status": "oom", "fidelity": 1.0}, constraint)
    assert stopped.fitness.dominates(failed.fitness)
    # equal values, different standing: DEAP's sort groups by fitness, which must tell them apart
    twin = SimpleNamespace(fitness=creator.FitnessMulti())
    set_fitness(twin, (0.9, 0.8), {"fidelity": 1.0}, constraint)
    fronts = tools.sortNondominated([stopped, twin], 2)
    assert [len(f) for f in fronts] == [1, 1] and fronts[0][0] is twin


def test_halving_resumes_and_runs_under_scoop(runs, tmp_path):
    root, _ = runs
    resumed = tmp_path / "resumed"
    run_cli(FAST + HALVING + ["--generations", "1", "--save-weights", "all", "--out", str(resumed)])
    run_cli(["--resume", str(resumed), "--generations", "2"])
    run_cli(FAST + HALVING + ["--generations", "2", "--save-weights", "all", "--out", str(tmp_path / "scoop")],
            scoop=True)
    want = [without_timing(pd.read_csv(root / "halving" / name)) for name in ("individuals.csv", "pareto.csv")]
    for other in (resumed, tmp_path / "scoop"):
        for name, frame in zip(("individuals.csv", "pareto.csv"), want):
            pd.testing.assert_frame_equal(without_timing(pd.read_csv(other / name)), frame)


def test_halving_options_are_checked():
    proc = run_cli(FAST + ["--fidelity", "thirds", "--out", "/nonexistent/x"], check=False)
    assert proc.returncode == 2 and "fidelity must be one of full, halving" in proc.stderr
    proc = run_cli(FAST + HALVING + ["--halving-budget", "1", "--out", "/nonexistent/x"], check=False)
    assert proc.returncode == 2 and "halving_budget must be in (0, 1)" in proc.stderr


def test_report_groups_by_fidelity_and_best_ignores_stopped(runs, tmp_path):
    from nero_deap.commands.report import load_run, summary_table, write_report

    root, _ = runs
    table = summary_table([load_run(root / "full"), load_run(root / "halving")]).set_index("run")
    assert table.loc["full", "group"] == "nsga2 on clean,fgsm"
    assert table.loc["halving", "group"] == "nsga2 on clean,fgsm, halving"
    ind = pd.read_csv(root / "halving" / "individuals.csv")
    complete = ind[(ind.fidelity == 1) & (ind.status == "ok")]
    assert table.loc["halving", "best_fgsm"] == complete.fgsm_acc.max()
    assert table.loc["halving", "stopped"] == (ind.fidelity < 1).sum() and table.loc["full", "stopped"] == 0
    written = write_report([root / "full", root / "halving"], tmp_path / "report", echo=lambda *a: None)
    assert (tmp_path / "report" / "hypervolume_runs.png") in written
    assert "halving" in (tmp_path / "report" / "summary.md").read_text()


def test_same_padding_is_done_by_the_convolution_with_the_old_keys(splits):
    """Symmetric 'same' padding goes into nn.Conv2d (no padded copy of each input); the placeholder keeps
    the parameter names of networks saved before, and the output is that of explicit zero padding."""
    import torch.nn.functional as F
    from torch import nn

    net = build_network(Phenotype.from_text(NET + LEARNING["adam"]), mean=splits.mean, std=splits.std).eval()
    block = net.nodes[0]
    assert isinstance(block[0], nn.Identity) and block[1].padding == (1, 1)
    assert "nodes.0.1.weight" in net.state_dict()
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(block[1](x), F.conv2d(F.pad(x, (1, 1, 1, 1)), block[1].weight, block[1].bias), atol=1e-5)
    asymmetric = build_network(Phenotype.from_text(NET.replace("filter-shape:3 stride:1", "filter-shape:2 stride:1", 1)
                                                   + LEARNING["adam"]), mean=splits.mean, std=splits.std)
    assert isinstance(asymmetric.nodes[0][0], nn.ConstantPad2d)  # 2x2 'same' pads 0 left, 1 right
