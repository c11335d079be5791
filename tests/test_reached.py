"""experiments/reached.py: how the experiment scripts and the GPU check tell a finished search from one that
scoop's launcher reported as a success (it exits 0 whatever happened)."""
import subprocess
import sys

from conftest import ROOT


def reached(run, generation) -> int:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "reached.py"), str(run), str(generation)],
                          capture_output=True, timeout=120).returncode


def test_a_run_reached_the_generations_its_gens_csv_holds_and_no_more(tmp_path):
    (tmp_path / "gens.csv").write_text("gen,nevals\n0,4\n1,4\n")
    assert reached(tmp_path, 0) == 0 and reached(tmp_path, 1) == 0
    assert reached(tmp_path, 2) == 1


def test_a_missing_or_broken_gens_csv_is_not_reached(tmp_path):
    assert reached(tmp_path / "none", 0) == 1
    (tmp_path / "gens.csv").write_text("nothing,here\n1,2\n")
    assert reached(tmp_path, 0) == 1
