"""Packaging and the command line: the installed command, subcommands, entry points, no import cycle."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_GRAMMAR
from nero_deap.cli import COMMANDS, build_parser, main

TINY_RUN = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--population", "4", "--generations", "1",
            "--epochs", "0.2", "--threads", "1"]


def test_installed_command_lists_subcommands_and_finds_packaged_grammars(tmp_path):
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("setuptools.command.bdist_wheel") \
            is None:
        pytest.skip("building the package offline needs setuptools >= 70.1 (requirements-dev.txt pins it)")
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "grammars", src / "grammars")
    shutil.copytree(ROOT / "nero_deap", src / "nero_deap", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, str(site / "bin" / "nero-deap")]
    top = subprocess.run(command + ["--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    assert all(name in top.stdout for name in ("search", "final", "report"))
    search = subprocess.run(command + ["search", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=120)
    assert search.returncode == 0 and "--grammar" in search.stdout
    probe = ("import nero_deap.common.resources as r; from nero_deap.store.config import RunConfig; "
             "print(r.grammar_file(RunConfig().grammar)); print(r.grammar_file('fast-denser-cifar10.grammar'))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=120, check=True).stdout.split()
    assert [os.path.dirname(p) for p in found] == [str(site / "nero_deap" / "grammars")] * 2
    assert open(found[0]).read() == (ROOT / "grammars" / "cnn.grammar").read_text()
    kernels = site / "nero_deap" / "nets" / "kernels" / "cpu_kernels.c"  # built from the installed source
    assert kernels.read_text() == (ROOT / "nero_deap" / "nets" / "kernels" / "cpu_kernels.c").read_text()
    metadata = next(site.glob("nero_deap-*.dist-info")) / "METADATA"
    assert "License-Expression: MIT" in metadata.read_text()  # and the licence text ships with it
    assert any(path.read_text().startswith("MIT License") for path in site.glob("nero_deap-*.dist-info/**/LICENSE*"))


def test_every_option_of_every_command_has_help():
    from nero_deap.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}" for name, sub in commands.items()
               for action in sub._actions if not action.help]
    assert missing == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert COMMANDS[command][0].split()[0] in capsys.readouterr().out.lower()


def test_no_subcommand_means_search():
    parser = build_parser()
    from nero_deap.cli import _with_command

    assert parser.parse_args(_with_command(["--population", "8"])).command == "search"
    assert parser.parse_args(_with_command([])).command == "search"
    assert parser.parse_args(_with_command(["report", "runs/x"])).command == "report"


def test_python_m_nero_deap_and_run_py_are_the_same_command():
    for entry in (["-m", "nero_deap"], [str(ROOT / "run.py")]):
        proc = subprocess.run([sys.executable] + entry + ["--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "final" in proc.stdout and "report" in proc.stdout


def test_scoop_runs_the_package_entry_point(tmp_path):
    """SCOOP 0.7.2 takes a script path, not -m: nero_deap/__main__.py is that script."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scoop", "-n", "2", str(ROOT / "nero_deap" / "__main__.py"),
                           "search"] + TINY_RUN + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert (out / "gens.csv").exists(), proc.stdout + proc.stderr
    assert len((out / "gens.csv").read_text().splitlines()) == 3  # header, generations 0 and 1


def test_library_modules_do_not_import_the_cli():
    code = ("import sys, nero_deap.commands.final, nero_deap.commands.report, nero_deap.commands.search; "
            "assert 'nero_deap.cli' not in sys.modules, 'library modules import the CLI'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    for path in (ROOT / "nero_deap").glob("*.py"):
        if path.name == "cli.py":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level) + (node.module or ""))
        assert "argparse" not in imported and ".cli" not in imported, f"{path.name} depends on the CLI"


def test_library_api_is_importable_lazily():
    code = ("import sys, nero_deap; assert 'torch' not in sys.modules; "
            "from nero_deap import run_search, run_final, run_report, RunConfig, FinalSettings, ReportSettings; "
            "assert callable(run_final)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


SMALL = "layer:conv num-filters:4 input:-1 | layer:fc num-units:10 input:0 || learning:sgd lr:0.05"


def test_evaluate_checks_its_input_as_search_does(tmp_path, capsys):
    """evaluate once printed a missing dataset as a zero score, read a missing file name as phenotype text,
    choked on a byte-order mark, took --resume/--out and ignored them, and printed params twice."""
    fast = ["--data", "synthetic:40", "--epochs", "0.1", "--threads", "1"]

    def one_line(code):
        out = capsys.readouterr()
        assert code == 2 and out.out == "" and len(out.err.strip().splitlines()) == 1, out
        return out.err.strip()

    assert "error: --data '/nonexistent': no such file" in one_line(main(["evaluate", SMALL, "--data", "/nonexistent"]))
    assert "val_size 1 does not fit" in one_line(main(["evaluate", SMALL, *fast, "--val-size", "1"]))
    assert "no such file (and not a phenotype" in one_line(main(["evaluate", str(tmp_path / "nofile.txt"), *fast]))
    with pytest.raises(SystemExit) as stop:  # argparse: a search's own option does not apply
        main(["evaluate", SMALL, *fast, "--resume", str(tmp_path)])
    assert stop.value.code == 2 and "unrecognized arguments: --resume" in capsys.readouterr().err
    bom = tmp_path / "bom.txt"
    bom.write_text("# a comment\n" + SMALL.replace(" || ", "\n || ") + "\n", encoding="utf-8-sig")
    assert main(["evaluate", str(bom), *fast, "--objectives", "clean,params"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("clean ") and line.count("params ") == 1 and line.endswith("ok"), line


@pytest.mark.parametrize("argv, expected", [
    (["final", "somewhere"], "(one every two minutes); continue with the same options and --resume"),
    (["--grammar", "x", "--out", "runs/nowhere"],
     "runs/nowhere holds no checkpoint to resume; run the same command again to start over"),
])
def test_an_interrupt_says_how_to_continue_that_command(argv, expected, capsys, monkeypatch):
    """Ctrl-C in final once spoke of generations and checkpoints, which final does not have."""
    import nero_deap.commands.final
    import nero_deap.commands.search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(nero_deap.commands.final, "run_final", interrupted)
    monkeypatch.setattr(nero_deap.commands.search, "run_search", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: ") and err.endswith(expected) and len(err.splitlines()) == 1, err


def test_an_interrupted_search_names_its_checkpointed_generation_and_path(tmp_path, capsys, monkeypatch):
    """The message once said "--resume RUN" literally, and claimed a checkpoint during generation 0."""
    import shutil

    import nero_deap.commands.search

    run = tmp_path / "my run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-v2", run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(nero_deap.commands.search, "run_search", interrupted)
    assert main(["search", "--resume", str(run), "--generations", "3"]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: generation 1 is checkpointed; continue with --resume {run}"


@pytest.mark.parametrize("argv, usage, hint", [
    (["--populaton", "4"], "usage: nero-deap search", "(did you mean --population?)"),
    (["final", "RUN", "--aa_n", "5"], "usage: nero-deap final", "(did you mean --aa-n?)"),
    (["report", "RUN", "--zzz"], "usage: nero-deap report", "unrecognized arguments: --zzz"),
])
def test_a_misspelt_option_shows_its_commands_usage_and_the_closest_option(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(usage) and hint in err, err


@pytest.mark.parametrize("argv, message", [
    (["search", "--resume", "RUNDIR", "--out", "elsewhere"], "error: --out elsewhere: a resumed run stays in its "
                                                              "folder (RUNDIR); leave --out out"),
    (["evaluate", "grammars/reference/vgg-small.txt", "--id", "-1"], "error: --id must be a candidate id (>= 0), "
                                                                       "got -1"),
])
def test_options_a_command_would_ignore_or_misuse_are_refused(argv, message, capsys, tmp_path):
    """These exited 0: --out was ignored without a word, and --id -1 seeded a candidate no run has."""
    argv = [str(tmp_path / "run") if a == "RUNDIR" else a for a in argv]
    message = message.replace("RUNDIR", str(tmp_path / "run"))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_resume_that_changes_the_thread_count_warns_that_the_bits_change(tmp_path):
    import shutil

    import warnings

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-v2", run)  # accelerate auto: float32 on a CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: its numbers do not depend on the threads
        assert main(["search", "--resume", str(run), "--generations", "1", "--threads", "1"]) == 0
    bf16 = tmp_path / "bf16"
    assert main(["search", "--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--val-size", "10",
                 "--population", "4", "--epochs", "0.2", "--generations", "0", "--accelerate", "on", "--out",
                 str(bf16)]) == 0
    with pytest.warns(UserWarning, match="--threads 1 differs from the run's default: on a CPU in bf16"):
        assert main(["search", "--resume", str(bf16), "--generations", "0", "--threads", "1"]) == 0
