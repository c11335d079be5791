"""Grammar start-up hardening: linear analysis of rule chains, learning values and range names checked at load."""
import time

import pytest

from conftest import ROOT
from nero_deap.cli import main
from nero_deap.space.grammar import Grammar, GrammarError, NonTerminal, Range
from nero_deap.space.structure import NetworkStructure

TAIL = ("<classification> ::= layer:fc num-units:8\n<softmax> ::= layer:fc act:softmax num-units:10\n"
        "<learning> ::= learning:adam lr:0.001 batch_size:32\n")
SHIPPED = sorted((ROOT / "grammars").glob("*.grammar")) + sorted((ROOT / "tests").glob("*.grammar"))


def chain_grammar(n: int) -> str:
    """A start rule reaching a chain of ``n`` rules, each of which may stop (so derivations stay shallow)."""
    lines = ["<features> ::= layer:conv num-filters:8 <c0>"]
    lines += [f"<c{i}> ::= <c{i + 1}> | padding:same" for i in range(n)] + [f"<c{n}> ::= stride:1"]
    return "\n".join(lines) + "\n" + TAIL


def key_of(symbol) -> set:
    return {symbol.name if isinstance(symbol, Range) else symbol.text.split(":", 1)[0]}


def fixpoint(grammar: Grammar, rules: set) -> dict:
    """The quadratic fixpoint ``Grammar.derivable`` replaces, kept here as the reference for its results."""
    keys = {nt: set() for nt in rules}
    changed = True
    while changed:
        changed = False
        for nt in rules:
            new = set().union(*(keys.get(s.name, set()) if isinstance(s, NonTerminal) else key_of(s)
                                for alt in grammar.rules[nt] for s in alt))
            if not new <= keys[nt]:
                keys[nt] |= new
                changed = True
    return keys


def search(grammar, tmp_path, capsys) -> str:
    """The search command's one-line error for ``grammar`` (exit 2)."""
    path = tmp_path / "g.grammar"
    path.write_text(grammar)
    rc = main(["search", "--grammar", str(path), "--data", "synthetic", "--generations", "0", "--population", "4",
               "--epochs", "0.05", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    return err.removeprefix(f"{path}:")


# ------------------------------------------------------------ 1. rule chains: linear start-up
def test_a_chain_of_20000_rules_loads_validates_and_is_analysed_in_seconds(tmp_path):
    """Quadratic before: warn_unreachable walked the grammar once per rule (13 s for 4,000 rules, minutes for
    20,000), and so did the fixpoint over settable keys; each is one linear pass now (about 0.5 s here)."""
    path = tmp_path / "chain.grammar"
    path.write_text(chain_grammar(20000))
    start = time.perf_counter()
    grammar = Grammar.from_file(path)
    structure = NetworkStructure()
    structure.validate(grammar)
    reachable = grammar.reachable([m.name for m in structure.modules] + [structure.output] + list(structure.macro))
    keys = grammar.derivable(reachable, key_of)
    assert time.perf_counter() - start < 10
    assert keys["features"] == {"layer", "num-filters", "padding", "stride"} and keys["c19999"] == {"padding", "stride"}


@pytest.mark.parametrize("text", [
    "<a> ::= <b> x:1 | y:2\n<b> ::= <c> | <a> z:3\n<c> ::= [w,int,1,0,1] | <b>\n<d> ::= <a> q:1\n",
    # nested loops: a fixpoint over them needs one pass per level
    "<r> ::= <a> r:1\n<a> ::= <b> a:1 | <r>\n<b> ::= <c> b:1 | <a>\n<c> ::= c:1 | <b> | <e>\n<e> ::= e:1\n",
    "<a> ::= <a> <a> | x:1\n",
])
def test_derivable_gives_the_fixpoint_s_results(text):
    grammar = Grammar.from_text(text)
    for starts in ([next(iter(grammar.rules))], list(grammar.rules)):
        rules = grammar.reachable(starts)
        assert grammar.derivable(rules, key_of) == fixpoint(grammar, rules)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_derivable_gives_the_fixpoint_s_results_on_the_shipped_grammars(path):
    grammar = Grammar.from_file(path)
    for starts in (["features", "classification", "softmax", "learning"], list(grammar.rules)):
        rules = grammar.reachable(starts)
        assert grammar.derivable(rules, key_of) == fixpoint(grammar, rules)


def test_the_search_command_starts_on_a_chain_of_20000_rules(tmp_path, capsys):
    path = tmp_path / "chain.grammar"
    path.write_text(chain_grammar(20000).replace("num-filters:8 <c0>", "stride:2 <c0>"))
    start = time.perf_counter()
    rc = main(["search", "--grammar", str(path), "--data", "synthetic", "--generations", "0", "--population", "4",
               "--epochs", "0.05", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 30  # start-up under 1 s, and 4 tiny trainings
    # the grammar check followed the whole chain: stride is set only at its far end
    assert rc == 2 and err == f"{path}:1:1: <features> can set 'stride' twice (stride:2 and <c0>): a phenotype " \
        "keeps one value", err


# ------------------------------------------------------------ 2. learning values: checked when read
@pytest.mark.parametrize("value, col, message", [
    ("momentum:p.9", 30, "momentum:p.9: momentum must be a number, got 'p.9'"),
    ("lr:-1", 30, "lr:-1: lr must be > 0, got -1"),
    ("lr:0", 30, "lr:0: lr must be > 0, got 0"),
    ("decay:-inf", 30, "decay:-inf: decay must be finite, got -inf"),
    ("decay:1e308", 30, "decay:1e308: decay must be in [0, 1], got 1e+308"),
    ("weight_decay:nan", 30, "weight_decay:nan: weight_decay must be finite, got nan"),
    ("momentum:1", 30, "momentum:1: momentum must be in [0, 1), got 1"),
    ("beta1:-0.5", 30, "beta1:-0.5: beta1 must be in [0, 1], got -0.5"),
    ("lr:0.1,0.2", 30, "lr:0.1,0.2: lr takes one number, got a list 0.1,0.2"),
    ("lr:True", 30, "lr:True: lr must be a number, got True"),
    ("batch_size:inf", 30, "batch_size:inf: batch_size must be finite, got inf"),
    ("[lr,float,2,0.01,0.1]", 30, "malformed range '[lr,float,2,0.01,0.1]': lr takes one number, the range gives 2"),
    ("[lr,float,1,-1,0.1]", 30, "malformed range '[lr,float,1,-1,0.1]': lr must be > 0, got -1.0"),
    ("[momentum,float,1,0.5,1]", 30, "malformed range '[momentum,float,1,0.5,1]': momentum must be in [0, 1), "
                                     "got 1.0"),
    ("[alpha,float,1,0.5,2]", 30, "malformed range '[alpha,float,1,0.5,2]': alpha must be in [0, 1], got 2.0"),
])
def test_learning_values_training_cannot_use_are_refused_when_the_grammar_is_read(value, col, message):
    """Each of these loaded, then every candidate using it scored 'error' at training time."""
    text = "<features> ::= layer:conv\n<learning> ::= learning:adam " + value + " batch_size:32\n"
    with pytest.raises(GrammarError) as info:
        Grammar.from_text(text, "bad.grammar")
    assert str(info.value) == f"bad.grammar:2:{col}: {message}"


def test_a_bad_learning_value_stops_the_search_command_with_its_position(tmp_path, capsys):
    err = search(TAIL.replace("lr:0.001", "momentum:p.9") + "<features> ::= layer:conv num-filters:8\n",
                 tmp_path, capsys)
    assert err == "3:30: momentum:p.9: momentum must be a number, got 'p.9'"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_grammar_still_loads(path):
    assert Grammar.from_file(path).rules


def test_good_learning_values_and_other_keys_load():
    Grammar.from_text("<learning> ::= learning:gradient-descent lr:0.05 momentum:0 decay:0 nesterov:True "
                      "beta1:1 [rho,float,1,0.5,1] [weight_decay,float,1,0.0,0.001] batch_size:1 epochs:10 "
                      "early_stop:5 [learning_rate,int,1,1,3] x:p.9 rate:-1\n")


# ------------------------------------------------------------ 3. range names: no whitespace
@pytest.mark.parametrize("token", ["[ra\tte,float,1,0,1]", "[ra te,float,1,0,1]", "[ra\u00a0te,float,1,0,1]",
                                   "[lr:x,float,1,0.1,1]"])
def test_a_range_name_that_would_not_read_back_is_refused(token):
    with pytest.raises(GrammarError) as info:
        Grammar.from_text(f"<features> ::= layer:dropout {token}\n", "bad.grammar")
    assert str(info.value).startswith(f"bad.grammar:1:30: malformed range {token!r}: name "), str(info.value)
    assert str(info.value).endswith("has whitespace or ':'")


def test_spaces_around_a_range_name_are_still_fine():
    grammar = Grammar.from_text("<features> ::= layer:dropout [ rate ,float,1,0,0.5]\n")
    assert grammar.rules["features"][0][1].name == "rate"


def test_a_range_name_with_whitespace_stops_the_search_command_with_its_position(tmp_path, capsys):
    err = search(TAIL + "<features> ::= layer:conv [num\tfilters,int,1,4,8]\n", tmp_path, capsys)
    assert err == "4:27: malformed range '[num\\tfilters,int,1,4,8]': name 'num\\tfilters' has whitespace or ':'"
