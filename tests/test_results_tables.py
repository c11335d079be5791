"""BENCHMARKS.md and RESULTS.md are generated from committed data: bench/results_tables.py --check must pass on
the real files, and must fail when a data value changes or a data file goes missing."""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "results_tables.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    return load_script()


@pytest.fixture
def copy(tmp_path):
    """The markdown files, the claims index and every data file, in a scratch repository root."""
    for doc in ("BENCHMARKS.md", "RESULTS.md"):
        shutil.copy(ROOT / doc, tmp_path / doc)
    for folder in ("bench/results", "experiments/results"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def test_the_committed_tables_are_up_to_date(tables, capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_each_page_fits_in_250_lines():
    for doc in ("BENCHMARKS.md", "RESULTS.md"):
        assert len((ROOT / doc).read_text().splitlines()) <= 250, doc


def test_a_copy_checks_clean(tables, copy):
    assert tables.main(["--check", "--root", str(copy)]) == 0


def test_a_changed_data_value_fails_the_check(tables, copy, capsys):
    data = copy / "bench/results/cpu-2026-11-27-native/accuracy.txt"
    text = data.read_text()
    assert "1290 images/s" in text
    data.write_text(text.replace("1290 images/s", "1390 images/s"))
    assert tables.main(["--check", "--root", str(copy)]) == 1
    assert "speed-equal-epochs" in capsys.readouterr().err


def test_a_changed_transcribed_value_fails_the_check(tables, copy, capsys):
    data = copy / "experiments/results/nsga2-vs-random-gen8.csv"
    data.write_text(data.read_text().replace("12,f52398e,68,72,0.0622,0.0311", "12,f52398e,68,72,0.0222,0.0311"))
    assert tables.main(["--check", "--root", str(copy)]) == 1
    assert "nsga2-vs-random-12" in capsys.readouterr().err


def test_a_missing_data_file_fails_the_check(tables, copy, capsys):
    (copy / "bench/results/h200-2026-11-27/search-w4-gens.csv").unlink()
    assert tables.main(["--check", "--root", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "throughput-h200-w4" in err and "search-w4-gens.csv is missing" in err


def test_an_edited_table_fails_the_check_and_is_rewritten(tables, copy, capsys):
    doc = copy / "BENCHMARKS.md"
    edited = doc.read_text().replace("| 58,117 vs 19,752 images/s (2.94x) |", "| 60,000 vs 19,752 images/s (3.04x) |")
    assert edited != doc.read_text()
    doc.write_text(edited)
    assert tables.main(["--check", "--root", str(copy)]) == 1
    assert "table gpu-check is out of date" in capsys.readouterr().err
    assert tables.main(["--root", str(copy)]) == 0
    assert tables.main(["--check", "--root", str(copy)]) == 0
    assert (copy / "BENCHMARKS.md").read_text() == (ROOT / "BENCHMARKS.md").read_text()


def test_the_exact_tests_give_scipys_p_values(tables):
    """scipy.stats.wilcoxon(d, method="exact") and binomtest(k, n) gave these p-values (scipy 1.17)."""
    d = [0.0076, -0.0024, -0.012, 0.0039, 0.0077, 0.0289, 0.001, -0.003]
    assert tables.wilcoxon_p(d[:6]) == pytest.approx(0.4375)
    assert tables.wilcoxon_p(d) == pytest.approx(0.4609375)
    assert tables.sign_test_p(10, 2) == pytest.approx(0.03857421875)
    assert tables.sign_test_p(3, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        tables.wilcoxon_p([1, -1, 2])
