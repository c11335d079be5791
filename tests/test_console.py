"""What the search prints: each generation's line, its cost estimate, and the Pareto front at the end."""
from __future__ import annotations

from nero_deap.cli import main
from nero_deap.commands.search import cost_estimate, phenotype_summary

PHENOTYPE = ("layer:conv num-filters:8 input:-1 | layer:pool-max kernel-size:2 input:0 | layer:conv num-filters:6 "
             "input:1 | layer:fc num-units:10 input:2 || learning:adam lr:0.001")


def test_a_phenotype_is_summarised_by_its_layer_types_and_optimiser():
    assert phenotype_summary(PHENOTYPE) == "conv x2, pool-max x1, fc x1; adam"


def test_a_long_search_says_how_long_after_generation_0_and_a_short_one_does_not():
    row = {"gen": 0, "wall_s": 400.0}
    assert cost_estimate(row, 10) == "  estimate: up to 1.1 h for 10 more"
    assert cost_estimate(row, 5) == ""  # 2,000 s: under an hour, nothing to warn about
    assert cost_estimate({**row, "gen": 1}, 10) == ""  # said once, after generation 0


def test_the_search_ends_with_its_front_as_a_table(tmp_path, capsys, tiny_grammar_path):
    code = main(["search", "--grammar", str(tiny_grammar_path), "--data", "synthetic:200", "--population", "4",
                 "--generations", "1", "--epochs", "0.2", "--threads", "1", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert all("flagged for masking " in line and "(see audit_acc)" in line for line in out if line.startswith("gen "))
    header = out[out.index(next(line for line in out if line.startswith("done: "))) + 1].split()
    assert header == ["id", "clean", "fgsm", "params", "masking", "network"]
