"""Peer grammar dialects: EvoDENSS names decode to their meaning; unknown names make invalid candidates."""
import pandas as pd
import pytest
import torch

from conftest import ROOT
from nero_deap.cli import main
from nero_deap.space.dialect import NetworkError, canonical_layer, canonical_learning
from nero_deap.search.fitness import EvalContext, evaluate_phenotype
from nero_deap.nets.network import build_network
from nero_deap.space.grammar import GrammarError
from nero_deap.space.phenotype import Phenotype
from nero_deap.commands.search import check_decodable
from nero_deap.engine.train import make_optimizer

EVODENSS = ROOT / "tests" / "evodenss.grammar"
FEATURES_ONLY = ROOT / "tests" / "features-only.grammar"


def test_evodenss_layer_names_decode_to_their_meaning():
    assert canonical_layer({"layer": "conv", "out_channels": 8, "kernel_size": 5, "input": [-1]}) == \
        {"layer": "conv", "num-filters": 8, "kernel-size": 5, "input": [-1]}
    assert canonical_layer({"layer": "pool_max", "kernel_size": 2})["layer"] == "pool-max"
    assert canonical_layer({"layer": "pool_avg"})["layer"] == "pool-avg"
    assert canonical_layer({"layer": "batch_norm"}) == {"layer": "batch-norm"}
    assert canonical_layer({"layer": "fc", "out_features": 64}) == {"layer": "fc", "num-units": 64}
    assert canonical_layer({"layer": "pooling", "pooling-type": "avg"}) == {"layer": "pool-avg"}
    net = build_network(Phenotype([{"layer": "conv", "out_channels": 6, "kernel_size": 5, "padding": "valid",
                                    "input": [-1]},
                                   {"layer": "pool_max", "kernel_size": 2, "stride": 2, "input": [0]},
                                   {"layer": "fc", "out_features": 10, "input": [1]}], {}))
    conv = net.nodes[0][0]
    assert (conv.out_channels, conv.kernel_size) == (6, (5, 5))
    assert isinstance(net.nodes[1], torch.nn.MaxPool2d) and net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_evodenss_learning_names_decode_to_their_meaning():
    params = [torch.nn.Parameter(torch.zeros(1))]
    sgd = make_optimizer(params, {"learning": "gradient_descent", "lr": 0.05, "weight_decay": 0.001,
                                  "nesterov": True, "early_stop": 5, "epochs": 100})
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["weight_decay"] == 0.001 and sgd.defaults["nesterov"]
    rms = make_optimizer(params, {"learning": "rmsprop", "alpha": 0.8, "weight_decay": 0.0002})
    assert isinstance(rms, torch.optim.RMSprop)
    assert rms.defaults["alpha"] == 0.8 and rms.defaults["weight_decay"] == 0.0002
    assert canonical_learning({"learning": "sgd-nesterov"}) == {"learning": "gradient-descent", "nesterov": True}


@pytest.mark.parametrize("layer, learning, expected, alias", [
    ({"layer": "pool_min"}, {}, "unknown layer type 'pool_min' (known: ", "pool_max"),
    ({"layer": "conv", "out_channel": 8}, {}, "unknown key 'out_channel' for layer:conv (known: ", "out_channels"),
    ({"layer": "fc"}, {"learning": "lars"}, "unknown optimiser learning:lars (known: ", "gradient_descent"),
    ({"layer": "fc"}, {"learning": "adam", "lr_weights": 0.1}, "unknown learning key 'lr_weights' (known: ",
     "weight_decay"),
])
def test_unknown_names_make_invalid_candidates_listing_the_known_ones(layer, learning, expected, alias):
    phenotype = Phenotype([{**layer, "input": [-1]}], learning)
    with pytest.raises(NetworkError, match="known: "):
        build_network(phenotype)
        canonical_learning(learning)
    ctx = EvalContext(grammar_path="", data="synthetic:40", epochs=0.1, device="cpu", threads=1)
    fitness, meta = evaluate_phenotype(phenotype, ctx, seed=1)
    assert fitness == (0.0, 0.0) and meta["status"] == "invalid"
    assert meta["reason"].startswith(expected) and alias in meta["reason"], meta["reason"]


@pytest.mark.parametrize("grammar, note", [(EVODENSS, None),
                                           (FEATURES_ONLY, "note: the grammar has no <classification> rule")])
def test_dialect_grammars_run_with_valid_candidates(grammar, note, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--grammar", str(grammar), "--data", "synthetic:40", "--population", "4", "--generations", "1",
                 "--epochs", "0.3", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert note is None or note in printed
    individuals = pd.read_csv(out / "individuals.csv")
    assert set(individuals.gen) == {0, 1} and (individuals.status == "ok").all(), individuals.reason.tolist()
    if grammar == FEATURES_ONLY:
        assert all(" | ".join(p.split(" | ")[-1:]).startswith("layer:fc act:softmax") for p in individuals.phenotype)
        assert not any("num-units:" in part for p in individuals.phenotype for part in p.split(" | ")[:-1])


@pytest.mark.parametrize("layer, learning, expected", [
    ({"layer": "conv", "batch-norm": "false"}, {}, "layer:conv: batch-norm must be True or False, got 'false'"),
    ({"layer": "fc", "num-units": 4, "bias": 1}, {}, "layer:fc: bias must be True or False, got 1"),
    ({"layer": "conv", "padding": "smae"}, {}, "layer:conv: padding must be same or valid, got 'smae'"),
    ({"layer": "pooling", "pooling-type": "average"}, {}, "pooling-type must be max or avg, got 'average'"),
    ({"layer": "fc", "num-units": 4}, {"learning": "adam", "amsgrad": "yes"}, "learning: amsgrad must be True or False, got 'yes'"),
    ({"layer": "conv", "filters": 4, "num-filters": 8}, {}, "'num-filters' given twice (filters and num-filters)"),
    ({"layer": "conv", "filter-shape": 3, "kernel-size": 5}, {}, "filter-shape and kernel-size name the same thing"),
    ({"layer": "fc", "num-units": 4}, {"lr": 0.1, "learning_rate": 0.2}, "learning: 'lr' given twice (lr and learning_rate)"),
])
def test_values_outside_a_keys_choices_make_invalid_candidates(layer, learning, expected):
    """``bias:false`` once kept the bias, ``padding:smae`` meant valid, ``pooling-type:average`` max-pooling,
    and of two names for one key the last won: each trained another network than the text said."""
    phenotype = Phenotype([{**layer, "input": [-1]}, {"layer": "fc", "num-units": 10, "input": [0]}], learning)
    ctx = EvalContext(grammar_path="", data="synthetic:40", epochs=0.1, device="cpu", threads=1)
    fitness, meta = evaluate_phenotype(phenotype, ctx, seed=1)
    assert meta["status"] == "invalid" and expected in meta["reason"], meta["reason"]
    assert canonical_layer({"layer": "conv", "bias": False, "padding": "SAME"})["padding"] == "SAME"  # as before


def test_a_key_twice_in_phenotype_text_is_refused():
    with pytest.raises(ValueError, match="'num-filters' given twice"):
        Phenotype.from_text("layer:conv num-filters:4 num-filters:8 input:-1 || learning:sgd")


@pytest.mark.parametrize("terminal, expected", [
    ("bias:false", "bias must be True or False, got 'false'"),
    ("padding:smae", "padding must be same or valid, got 'smae'"),
    ("[bias,int,1,0,1]", "[bias,...]: a numeric gene cannot give bias, which takes True or False"),
    ("num-filters:4 num-filters:8", "<features> can set 'num-filters' twice (num-filters:4 and num-filters:8)"),
    ("[num-filters,int,1,4,8] num-filters:16", "can set 'num-filters' twice ([num-filters,...] and num-filters:16)"),
    ("filters:4 num-filters:8", "can set 'num-filters' twice (filters:4 and num-filters:8)"),
    ("filter-shape:3 kernel-size:5", "can set 'filter-shape' twice (filter-shape:3 and kernel-size:5)"),
    ("num-filters:4 <more>", "can set 'num-filters' twice (num-filters:4 and <more>)"),  # through a nested rule
])
def test_the_grammar_check_refuses_such_terminals_with_their_position(terminal, expected, tmp_path):
    """Each of these once passed start-up and then either failed every candidate or built another network
    than the grammar said (the last of two values won)."""
    from nero_deap.space.grammar import Grammar

    path = tmp_path / "bad.grammar"
    path.write_text(f"<features> ::= layer:conv {terminal}\n<softmax> ::= layer:fc num-units:10\n"
                    "<more> ::= stride:1 | num-filters:8\n")
    with pytest.raises(GrammarError) as err:
        check_decodable(Grammar.from_file(path), ["features", "softmax"])
    assert expected in str(err.value) and str(err.value).startswith(f"{path}:1:"), str(err.value)
    path.write_text("<features> ::= layer:conv num-filters:4 <more>\n<softmax> ::= layer:fc num-units:10\n"
                    "<more> ::= stride:1 | padding:same\n")
    check_decodable(Grammar.from_file(path), ["features", "softmax"])  # no key twice: accepted
