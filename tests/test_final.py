"""Final stage, exported models, masking audit and reports."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import ROOT, TINY_GRAMMAR
from nero_deap import load_model
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.data import make_splits
from nero_deap.nets.export import save_model
from nero_deap.commands.final import FINAL_COLUMNS, FinalSettings, masking_reasons, robustness_metrics
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.commands.report import write_report

SETTINGS = FinalSettings(aa_n=8, sweep_n=60, threads=1, aa_iterations=3)


def search(out, seed, *extra):
    cmd = [sys.executable, str(ROOT / "run.py"), "--grammar", str(TINY_GRAMMAR), "--data", "synthetic",
           "--population", "4", "--generations", "1", "--epochs", "1", "--threads", "1", "--seed", str(seed),
           "--out", str(out), *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("final")
    return search(base / "a", 1), search(base / "b", 2, "--save-weights", "none")


def test_final_writes_csv_report_and_models(runs):
    run = runs[0]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "final", str(run), "--top", "1", "--epochs", "1",
                           "--adv", "fgsm-rs", "--aa-n", "8", "--aa-iterations", "3", "--sweep-n", "60", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "search: the weights the search scored" in proc.stdout
    assert "AutoAttack (reduced: 3 iterations) on 8 images: about " in proc.stdout  # its expected time, first
    assert "AutoAttack square: " in proc.stdout  # a line after each attack
    final = pd.read_csv(run / "final.csv")
    assert list(final.columns) == FINAL_COLUMNS
    assert list(final["mode"]) == ["search", "standard", "fgsm-rs"]
    assert list(final.source) == ["search weights", "retrained", "retrained"]
    stored = torch.load(run / "weights" / f"{final.arch[0]}.pt", weights_only=True)["state_dict"]
    exported = torch.load(final.model[0], weights_only=True)["state_dict"]
    assert stored.keys() == exported.keys() and all(torch.equal(stored[k], exported[k]) for k in stored)
    for col in ("clean", "fgsm", "pgd", "autoattack"):
        assert final[col].between(0, 1).all() and final[f"{col}_se"].notna().all()
    assert (final.aa_n == 8).all() and (final.aa_version == "reduced-3").all() and (final.pgd <= final.fgsm + 0.05).all()
    report = (run / "report.md").read_text()
    assert "(1) end of search" in report and "(3) adversarial training (FGSM-RS)" in report
    assert "Gradient-masking audit" in report
    assert "![accuracy under PGD-10 against epsilon](eps_sweep.png)" in report
    assert (run / "eps_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in final.model:
        assert load_model(path).training is False


def test_final_retrains_stage_one_when_the_run_kept_no_weights(runs):
    run = runs[1]
    assert not (run / "weights").exists() or not list((run / "weights").iterdir())
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "final", str(run), "--top", "1", "--epochs", "1",
                           "--aa-n", "0", "--sweep-n", "30", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "search: training 1 epochs" in proc.stdout
    final = pd.read_csv(run / "final.csv")
    assert list(final.source) == ["retrained", "retrained"] and final.autoattack.isna().all()
    assert "(retrained)" in (run / "report.md").read_text()


def test_a_retrained_stage_one_is_the_searchs_own_training_in_bf16_too(tmp_path):
    """Two identical bf16 searches, one keeping its weights and one not: ``final`` (its --accelerate left at
    the default, float32 on a CPU) must retrain the second's stage 1 as the search trained it, to the same
    weights; it used final's own setting and trained in float32."""
    kept = search(tmp_path / "kept", 3, "--accelerate", "on")
    bare = search(tmp_path / "bare", 3, "--accelerate", "on", "--save-weights", "none")
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "final", str(bare), "--top", "1", "--epochs", "1",
                           "--aa-n", "0", "--sweep-n", "20", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(bare / "final.csv").iloc[0]
    assert row["mode"] == "search" and row.source == "retrained"
    scored = torch.load(kept / "weights" / f"{row.arch}.pt", weights_only=True)["state_dict"]
    retrained = torch.load(row.model, weights_only=True)["state_dict"]
    assert scored.keys() == retrained.keys() and all(torch.equal(scored[k], retrained[k]) for k in scored)


def test_final_resume_keeps_finished_rows_and_redoes_the_rest(runs):
    run = runs[1]
    args = [sys.executable, str(ROOT / "run.py"), "final", str(run), "--top", "1", "--epochs", "1",
            "--aa-n", "0", "--sweep-n", "30", "--threads", "1"]
    if not (run / "final.csv").exists():
        assert subprocess.run(args, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    complete = pd.read_csv(run / "final.csv")
    complete.iloc[:1].to_csv(run / "final.csv", index=False)  # as if killed during stage (2)
    proc = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "search: done in an earlier run" in proc.stdout and "standard: training 1 epochs" in proc.stdout
    resumed = pd.read_csv(run / "final.csv")
    timing = ["train_s"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), complete.drop(columns=timing))
    changed = subprocess.run(args + ["--resume", "--epochs", "2"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert changed.returncode == 2 and "other settings" in changed.stderr


def test_final_refuses_search_weights_of_another_network(runs, tmp_path, capsys):
    import shutil

    from nero_deap.cli import main

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    (run / "final.csv").unlink(missing_ok=True)
    arch = int(pd.read_csv(run / "pareto.csv").id[0])
    other = build_network(Phenotype.from_text("layer:fc num-units:10 input:-1 || learning:sgd"), 10, (3, 32, 32),
                          (0.5,) * 3, (0.25,) * 3)
    save_model(other, run / "weights" / f"{arch}.pt", num_classes=10, in_shape=(3, 32, 32), mean=(0.5,) * 3,
               std=(0.25,) * 3)
    assert main(["final", str(run), "--top", "1", "--epochs", "1", "--aa-n", "0", "--sweep-n", "30",
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and f"holds another network than arch {arch} of the run" in err, err
    assert not (run / "final.csv").exists()


@pytest.mark.parametrize("args, expected", [
    (["--device", "bogus"], "device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--threads", "-2"], "--threads must be >= 0, got -2"),
    (["--epochs", "nan"], "--epochs must be > 0 and finite, got nan"),
    (["--epochs", "inf"], "--epochs must be > 0 and finite, got inf"),
    (["--adv", "pgd", "--adv-epochs", "0"], "--adv-epochs must be > 0 and finite, got 0.0"),
    (["--sweep-n", "0"], "--sweep-n must be >= 1, got 0"),
    (["--test-n", "0"], "--test-n must be >= 1 (leave it out for the whole test set), got 0"),
    (["--top", "-1"], "--top must be >= 0, got -1"),
])
def test_final_checks_every_option_before_loading_data_or_training(runs, args, expected, capsys, monkeypatch):
    from nero_deap.commands import final
    from nero_deap.cli import main

    monkeypatch.setattr(final, "load_raw", lambda *a, **k: pytest.fail("data loaded before the options were checked"))
    assert main(["final", str(runs[0]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err


def test_load_model_round_trips_logits(tmp_path):
    data = make_splits(load_raw("synthetic"))
    p = Phenotype.from_text("layer:conv num-filters:4 filter-shape:3 batch-norm:True act:relu input:-1 | "
                            "layer:fc num-units:10 input:0 || learning:sgd")
    model = build_network(p, 10, (3, 32, 32), data.mean, data.std)
    with torch.no_grad():  # non-trivial BN statistics and weights
        for q in model.parameters():
            q.add_(torch.randn_like(q) * 0.1)
        model.train()(torch.rand(16, 3, 32, 32))
    model.eval()
    x = torch.rand(5, 3, 32, 32)
    path = save_model(model, tmp_path / "m.pt", num_classes=10, in_shape=(3, 32, 32), mean=data.mean, std=data.std)
    loaded = load_model(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_model_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "nero-deap-model/1", "payload": Evil()}, path)
    with pytest.raises(Exception):
        load_model(path)


class Constant(nn.Module):
    """Ignores its input: the extreme case of gradient masking."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([3.0] + [0.0] * 9))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.sum(dim=(1, 2, 3))[:, None]


def test_constant_model_is_flagged_as_masking():
    data = make_splits(load_raw("synthetic"))
    settings = FinalSettings(aa_n=0, sweep_n=60)  # AutoAttack's Square on a constant net only burns time
    m = robustness_metrics(Constant(), data.test_x, data.test_y, settings, 8 / 255, seed=0)
    assert m["zero_grad"] == 1.0 and m["clean"] == m["fgsm"] == m["pgd"]
    reasons = masking_reasons(m, gap=0.1)
    assert any("zero" in r for r in reasons) and any("does not fall" in r for r in reasons)


def test_audit_rules():
    base = {"fgsm": 0.40, "pgd": 0.05, "square_extra": 0, "sweep_n": 500, "zero_grad": 0.0,
            "sweep": [(2 / 255, 0.6), (8 / 255, 0.2), (32 / 255, 0.0)]}
    assert any("FGSM exceeds PGD" in r for r in masking_reasons(base, 0.1))
    assert masking_reasons({**base, "pgd": 0.35}, 0.1) == []
    assert any("Square" in r for r in masking_reasons({**base, "pgd": 0.35, "square_extra": 3}, 0.1))
    rising = {**base, "pgd": 0.35, "sweep": [(2 / 255, 0.3), (8 / 255, 0.5), (32 / 255, 0.1)]}
    assert any("does not fall" in r for r in masking_reasons(rising, 0.1))
    assert any("zero on 6%" in r for r in masking_reasons({**base, "pgd": 0.35, "zero_grad": 0.06}, 0.1))
    assert masking_reasons({**base, "pgd": 0.35, "zero_grad": 0.04}, 0.1) == []
    # white-box accuracy above AutoAttack's on the same images: beyond two standard errors and 0.05, not within
    on_aa = {**base, "pgd": 0.35, "aa_n": 1000, "aa_fgsm": 0.40, "aa_pgd": 0.35, "autoattack": 0.28}
    assert [r for r in masking_reasons(on_aa, 0.1) if "AutoAttack" in r] == [
        "FGSM exceeds AutoAttack by 0.120 on the same 1000 images (> 0.050)",
        "PGD-20 exceeds AutoAttack by 0.070 on the same 1000 images (> 0.050)"]
    assert masking_reasons({**on_aa, "aa_n": 20}, 0.1) == []  # 20 images: two standard errors are ~0.2
    assert masking_reasons({**on_aa, "aa_n": 0, "autoattack": float("nan")}, 0.1) == []


def test_report_plots_one_and_two_runs(runs, tmp_path):
    one = write_report([runs[0]], tmp_path / "one", echo=lambda s: None)
    two = write_report(list(runs), tmp_path / "two", echo=lambda s: None)
    assert len(one) == 3 and len(two) == 7
    for path in one + two:
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert "best_fgsm" in (tmp_path / "two" / "summary.md").read_text()


def test_report_cli_rejects_non_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a search run" in proc.stderr and "Traceback" not in proc.stderr


def _damage(run, name, edit):
    path = run / name
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("name, edit, expected", [
    ("gens.csv", lambda text: "", "gens.csv: not a readable CSV (EmptyDataError)"),
    ("gens.csv", lambda text: text.splitlines()[0] + "\n", "gens.csv: no generation recorded"),
    ("gens.csv", lambda text: text.replace("hypervolume", "hv", 1), "gens.csv: missing column(s) hypervolume"),
    ("individuals.csv", lambda text: text.replace("status", "state", 1), "individuals.csv: missing column(s) status"),
    ("individuals.csv", lambda text: _cell(text, "clean_acc", "oops"), "individuals.csv:2: clean_acc is not a finite"),
    ("individuals.csv", lambda text: _cell(text, "fgsm_acc", "inf"), "individuals.csv:2: fgsm_acc is not a finite"),
    ("individuals.csv", lambda text: _cell(text, "clean_acc", ""), "individuals.csv:2: a successful evaluation"),
    ("gens.csv", lambda text: _cell(text, "hypervolume", "oops"), "gens.csv:2: hypervolume is not a finite"),
    ("config.toml", lambda text: text + 'objectives = "bogus"\n', "config.toml: "),
])
def test_report_on_damaged_run_files_is_one_line_naming_the_file(runs, tmp_path, capsys, name, edit, expected):
    import shutil

    from nero_deap.cli import main

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    if name == "config.toml":
        text = (run / name).read_text()
        (run / name).write_text("\n".join(line for line in text.splitlines() if not line.startswith("objectives")))
    _damage(run, name, edit)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err


def _cell(text: str, column: str, value: str) -> str:
    """``text`` (a CSV) with ``column`` of its first row set to ``value``."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    rows[1][rows[0].index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def test_report_keeps_runs_of_the_same_name_apart_and_refuses_one_run_twice(runs, tmp_path, capsys):
    import shutil

    from nero_deap.cli import main
    from nero_deap.commands.report import distinct_names

    a = Path(shutil.copytree(runs[0], tmp_path / "x" / "s1"))
    b = Path(shutil.copytree(runs[1], tmp_path / "y" / "s1"))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    plots = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"x-s1-objectives.png", "y-s1-objectives.png", "hypervolume_runs.png"} <= plots and len(plots) == 7
    capsys.readouterr()
    assert main(["report", str(a), str(tmp_path / "x" / ".." / "x" / "s1"), "--out", str(tmp_path / "r2")]) == 2
    assert "named twice" in capsys.readouterr().err
    assert distinct_names([Path("a/s"), Path("b/s"), Path("c")]) == ["a-s", "b-s", "c"]
    assert distinct_names([Path("a/s"), Path("z/a/s")]) == ["a-s-1", "a-s-2"]


@pytest.mark.parametrize("name, edit, expected", [
    ("pareto.csv", lambda text: _cell(text, "phenotype", "garbage"), "pareto.csv: arch "),
    ("pareto.csv", lambda text: _cell(text, "phenotype", "layer:conv num-filters:999999 input:-1 || learning:sgd"),
     "exceeds the limit"),
    ("pareto.csv", lambda text: _cell(text, "id", ""), "pareto.csv:2: a successful evaluation without its scores"),
    ("individuals.csv", lambda text: "", "individuals.csv: not a readable CSV"),
])
def test_final_on_damaged_run_files_is_one_line_before_any_training(runs, tmp_path, capsys, monkeypatch, name,
                                                                    edit, expected):
    import shutil

    from nero_deap.commands import final
    from nero_deap.cli import main

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    _damage(run, name, edit)
    monkeypatch.setattr(final, "train", lambda *a, **k: pytest.fail("trained before the run's files were checked"))
    assert main(["final", str(run), "--top", "1", "--epochs", "1", "--aa-n", "0", "--sweep-n", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err


def test_a_retraining_that_diverges_is_recorded_and_final_goes_on(runs, tmp_path, monkeypatch):
    """A non-finite loss in a retraining once stopped final with a traceback; --resume met it again each time."""
    import shutil

    from nero_deap.commands import final as final_module
    from nero_deap.engine.train import Diverged

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)  # no stored weights: stage (1) retrains too
    for leftover in ("final.csv", "final-settings.json"):
        (run / leftover).unlink(missing_ok=True)
    real_train = final_module.train

    def train(model, learning, x, y, settings, **kwargs):
        if settings.adv == "fgsm-rs":
            raise Diverged("non-finite loss at step 3")
        return real_train(model, learning, x, y, settings, **kwargs)

    monkeypatch.setattr(final_module, "train", train)
    settings = FinalSettings(top=1, epochs=1, adv=["fgsm-rs"], aa_n=0, sweep_n=30, threads=1)
    lines = []
    table = final_module.run_final(run, settings, echo=lines.append)
    assert list(table["mode"]) == ["search", "standard", "fgsm-rs"]
    diverged = table.iloc[2]
    assert diverged.source == "diverged: non-finite loss at step 3" and pd.isna(diverged.clean) and not diverged.model
    assert any("training diverged (non-finite loss at step 3)" in line for line in lines)
    assert table.iloc[:2].clean.notna().all() and "n/a" in (run / "report.md").read_text()
    again = final_module.run_final(run, FinalSettings(**{**settings.__dict__, "resume": True}), echo=lines.append)
    assert len(again) == 3 and sum("done in an earlier run" in line for line in lines) == 3


def copies_without_final(run: Path, *copies: Path) -> tuple:
    """Copies of a search run, without the final a module fixture ran on it."""
    import shutil

    for copy in copies:
        shutil.copytree(run, copy)
        for leftover in ("final.csv", "final-settings.json"):
            (copy / leftover).unlink(missing_ok=True)
    return copies


def test_a_final_killed_during_a_training_continues_from_its_snapshot(runs, tmp_path, monkeypatch):
    """final's trainings (50 epochs by default: hours on a CPU) write a snapshot as they go; a final killed
    during one continues from it with --resume, to the very weights an uninterrupted final reaches."""
    from nero_deap.commands import final as final_module
    from nero_deap.common.errors import ConfigError
    from nero_deap.commands.final import PARTIAL_SUFFIX, run_final

    plain, killed = copies_without_final(runs[1], tmp_path / "plain", tmp_path / "killed")
    settings = FinalSettings(top=1, epochs=2, aa_n=0, sweep_n=30, threads=1, skip_search_stage=True,
                             snapshot_seconds=0)
    reference = run_final(plain, settings, echo=lambda line: None)
    assert not list((plain / "models").glob(f"*{PARTIAL_SUFFIX}"))  # removed once the row is written

    real_write, writes = final_module.write_bytes_atomic, []

    def write_then_die(path, data):
        real_write(path, data)
        if str(path).endswith(PARTIAL_SUFFIX):
            writes.append(path)
            if len(writes) == 3:
                raise KeyboardInterrupt
    monkeypatch.setattr(final_module, "write_bytes_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_final(killed, settings, echo=lambda line: None)
    monkeypatch.setattr(final_module, "write_bytes_atomic", real_write)
    snapshot, = (killed / "models").glob(f"*{PARTIAL_SUFFIX}")
    assert not (killed / "final.csv").exists()
    with pytest.raises(ConfigError, match="made with other settings"):  # killed in its first training: checked
        run_final(killed, FinalSettings(**{**settings.__dict__, "resume": True, "epochs": 3}))
    lines = []
    resumed = run_final(killed, FinalSettings(**{**settings.__dict__, "resume": True}), echo=lines.append)
    assert any("continuing from its snapshot at step 3" in line for line in lines), lines
    model = f"{int(resumed.arch[0])}-standard.pt"
    weights = [torch.load(run / "models" / model, weights_only=True)["state_dict"] for run in (plain, killed)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    columns = ["clean", "fgsm", "pgd", "params"]
    pd.testing.assert_frame_equal(resumed[columns], reference[columns])

    stale = killed / "models" / f"{int(resumed.arch[0])}-standard-000000000000{PARTIAL_SUFFIX}"
    stale.write_bytes(b"another final's")
    lines.clear()
    run_final(killed, settings, echo=lines.append)  # a fresh final: says what it removes
    assert "removed 1 snapshot(s) of an unfinished earlier final (to continue one, use --resume)" in lines
    assert not stale.exists()
    (killed / "final.csv").unlink()  # killed again: its own snapshot damaged, one of other settings beside it
    snapshot.write_bytes(b"damaged")
    stale.write_bytes(b"another final's")
    lines.clear()
    again = run_final(killed, FinalSettings(**{**settings.__dict__, "resume": True}), echo=lines.append)
    assert any(f"{stale.name} was made with other settings or on another device; set aside" in line
               for line in lines), lines
    assert any("is not a training snapshot; training arch" in line for line in lines), lines
    pd.testing.assert_frame_equal(again[columns], reference[columns])


def test_a_final_killed_while_scoring_does_not_train_again(runs, tmp_path, monkeypatch):
    """Scoring a model (AutoAttack on the whole test set: an hour on a CPU) comes after its training; a final
    killed then continues from the finished training's snapshot: no step is trained again, and the row equals
    an uninterrupted final's."""
    from nero_deap.commands import final as final_module
    from nero_deap.commands.final import PARTIAL_SUFFIX, run_final

    plain, killed = copies_without_final(runs[1], tmp_path / "plain", tmp_path / "killed")
    settings = FinalSettings(top=1, epochs=2, aa_n=0, sweep_n=30, threads=1, skip_search_stage=True,
                             snapshot_seconds=3600)  # no snapshot during the training: only the finished one
    reference = run_final(plain, settings, echo=lambda line: None)

    def die(*args, **kwargs):
        raise KeyboardInterrupt
    real_metrics = final_module.robustness_metrics
    monkeypatch.setattr(final_module, "robustness_metrics", die)
    with pytest.raises(KeyboardInterrupt):
        run_final(killed, settings, echo=lambda line: None)
    monkeypatch.setattr(final_module, "robustness_metrics", real_metrics)
    snapshot, = (killed / "models").glob(f"*{PARTIAL_SUFFIX}")
    from nero_deap.engine import train as train_module
    epochs_run, real_batches = [], train_module.batches
    monkeypatch.setattr(train_module, "batches", lambda *a, **k: epochs_run.append(1) or real_batches(*a, **k))
    lines = []
    resumed = run_final(killed, FinalSettings(**{**settings.__dict__, "resume": True}), echo=lines.append)
    assert any("continuing from its snapshot at step" in line for line in lines), lines
    assert epochs_run == [] and not snapshot.exists()  # not one batch drawn: no step trained again
    columns = ["clean", "fgsm", "pgd", "params"]
    pd.testing.assert_frame_equal(resumed[columns], reference[columns])
    model = f"{int(resumed.arch[0])}-standard.pt"
    weights = [torch.load(run / "models" / model, weights_only=True)["state_dict"] for run in (plain, killed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_fresh_final_killed_before_its_first_row_leaves_no_earlier_rows_to_resume(runs, tmp_path, monkeypatch):
    """A fresh final writes its settings before its first training; killed before its first row, it left the
    earlier final's final.csv beside them, and --resume then kept rows made with other options as its own."""
    from nero_deap.commands import final as final_module
    from nero_deap.commands.final import run_final

    run, = copies_without_final(runs[1], tmp_path / "run")
    first = FinalSettings(top=1, epochs=1, aa_n=0, sweep_n=30, threads=1, skip_search_stage=True)
    run_final(run, first, echo=lambda line: None)
    second = FinalSettings(**{**first.__dict__, "epochs": 2})

    def die(*args, **kwargs):
        raise KeyboardInterrupt
    real_metrics = final_module.robustness_metrics
    monkeypatch.setattr(final_module, "robustness_metrics", die)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_final(run, second, echo=lines.append)
    assert any("removed the final.csv of an earlier final" in line for line in lines), lines
    monkeypatch.setattr(final_module, "robustness_metrics", real_metrics)
    lines.clear()
    resumed = run_final(run, FinalSettings(**{**second.__dict__, "resume": True}), echo=lines.append)
    assert list(resumed.epochs) == [2.0] and not any("done in an earlier run" in line for line in lines), lines


def test_the_eps_sweep_plot_reads_only_what_it_can():
    from nero_deap.commands.report import parse_sweep, plot_eps_sweep

    assert parse_sweep("0.00784:0.5000;0.03137:0.2500") == [(0.00784, 0.5), (0.03137, 0.25)]
    assert parse_sweep(float("nan")) == [] and parse_sweep("") == [] and parse_sweep("0.1:x") == []
    diverged_only = pd.DataFrame({"arch": [1], "mode": ["standard"], "eps_sweep": [float("nan")]})
    assert plot_eps_sweep(diverged_only, Path("/nonexistent/never.png"), 8 / 255) is False  # no file, no error


def test_an_autoattack_over_its_budget_is_refused_before_it_starts(runs, capsys):
    """AutoAttack on a CPU once ran for hours with no output; the default attacked the whole test set."""
    from nero_deap.cli import main

    run = runs[0]
    code = main(["final", str(run), "--top", "1", "--aa-n", "40", "--aa-budget", "0.0001", "--sweep-n", "20",
                 "--threads", "1", "--skip-search-stage", "--epochs", "0.2"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: AutoAttack on 40 images would take about ") and \
        err.strip().endswith("(over --aa-budget 0.0001 min); lower --aa-n, or continue this final with the same "
                             "options and --resume --aa-budget inf (its trainings go on from their last snapshots)"), err
    assert "AutoAttack (standard) on 40 images: about " in out
    # the advice works: --aa-budget is no result setting, so --resume accepts the change and goes on
    assert main(["final", str(run), "--top", "1", "--aa-n", "40", "--aa-budget", "inf", "--sweep-n", "20",
                 "--threads", "1", "--skip-search-stage", "--epochs", "0.2", "--resume", "--aa-iterations", "2"]) == 2
    assert "made with other settings" in capsys.readouterr().err  # --aa-iterations does change the numbers
    assert main(["final", str(run), "--top", "1", "--aa-n", "40", "--aa-budget", "inf", "--sweep-n", "20",
                 "--threads", "1", "--skip-search-stage", "--epochs", "0.2", "--resume"]) == 0


def test_autoattack_attacks_a_stated_sample_on_a_cpu_by_default():
    from nero_deap.commands.final import CPU_AA_N, autoattack_n

    assert autoattack_n(None, 10_000, torch.device("cpu")) == CPU_AA_N == 100
    assert autoattack_n(None, 10_000, torch.device("cuda")) == 10_000
    assert autoattack_n(5000, 300, torch.device("cpu")) == 300 and autoattack_n(0, 300, torch.device("cpu")) == 0


def test_the_console_line_puts_n_beside_every_accuracy():
    """``pgd 0.155  AA 0.200`` hid that AutoAttack ran on 5 images and PGD on 200."""
    from nero_deap.commands.final import result_line

    row = {"arch": 7, "mode": "standard", "clean": 0.81, "fgsm": 0.3, "pgd": 0.155, "autoattack": 0.2,
           "n_test": 200, "aa_n": 5, "masking": False, "masking_reasons": ""}
    line = result_line(row)
    assert "PGD-20 0.155 ± 0.026 (n 200)" in line and "AutoAttack 0.200 ± 0.179 (n 5)" in line
    assert line.endswith("not flagged for masking")
    big = result_line({**row, "n_test": 10_000, "aa_n": 0, "autoattack": float("nan"), "masking": True,
                       "masking_reasons": "input gradient is exactly zero"})
    assert "clean 0.810 (n 10000)" in big and "AutoAttack -" in big
    assert big.endswith("flagged for masking: input gradient is exactly zero")
