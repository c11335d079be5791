"""experiments/headline.sh --dry-run: both device calls of the headline campaign (search, `final` for the
evolved network and for the hand-designed baseline, the summary) with tiny settings on synthetic data on
the CPU, the second call working from the first call's bundle alone, as a committed search would be."""
import json
import math
import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def test_the_dry_run_scores_both_networks_in_all_three_stages(tmp_path):
    env = {**os.environ, "HEADLINE_RES": str(tmp_path / "res"), "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "experiments" / "headline.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (results,) = (tmp_path / "out").glob("*-headline")
    summary = json.loads((results / "summary.json").read_text())
    assert summary["device"] and summary["torch"]
    search = summary["search"]
    assert search["evaluations"] > 0 and search["generations"] >= 1 and search["wall_s"] > 0
    assert set(summary["networks"]) == {"evolved", "baseline"}
    for name, network in summary["networks"].items():
        assert set(network["stages"]) == {"1", "2", "3"}, name
        for stage, row in network["stages"].items():
            for key in ("clean", "fgsm", "pgd20", "autoattack", "seconds"):
                assert isinstance(row[key], float) and math.isfinite(row[key]), (name, stage, key)
                if key != "seconds":
                    assert 0.0 <= row[key] <= 1.0
            assert row["n_test"] > 0 and row["aa_n"] > 0, (name, stage)
            assert isinstance(row["masking"], bool)
        assert network["stages"]["3"]["mode"] == "pgd"
    # the bundle call 2 starts from: small, committable, with the chosen architecture's weights
    with tarfile.open(tmp_path / "out" / "headline-search.tar.gz") as bundle:
        names = bundle.getnames()
    arch = summary["networks"]["evolved"]["arch"]
    assert {"search/config.toml", "search/pareto.csv", "search/individuals.csv", "search/gens.csv",
            f"search/weights/{arch}.pt"} <= set(names)
    assert not any(n.startswith("search/weights/") and n != f"search/weights/{arch}.pt" for n in names)
    # at most 8 files come back from a device call
    assert len(list(results.iterdir())) + 1 <= 8
    development_only = "../" + "shared"  # the dataset path of the project's own machines, never a user's
    for path in [ROOT / "experiments" / "headline.sh", *results.iterdir()]:
        assert development_only not in path.read_text(errors="replace"), path
