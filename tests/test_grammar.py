"""Parser: accepted syntax, and one test per error kind with its line and column."""

import pytest

from nero_deap.space.grammar import Grammar, GrammarError, GrammarWarning, Range, Terminal
from nero_deap.space.structure import NetworkStructure

FAST_DENSER_EXAMPLE = """\
<features> ::= <convolution> | <convolution> | <pooling> | <pooling> | <dropout> | <batch-norm>
<convolution> ::= layer:conv [num-filters,int,1,32,256] [filter-shape,int,1,2,5] [stride,int,1,1,3] <padding> <activation-function> <bias>
<batch-norm> ::= layer:batch-norm
<pooling> ::= <pool-type> [kernel-size,int,1,2,5] [stride,int,1,1,3] <padding>
<pool-type> ::= layer:pool-avg | layer:pool-max
<padding> ::= padding:same | padding:valid
<dropout> ::= layer:dropout [rate,float,1,0,0.7]
<classification> ::= <fully-connected> | <dropout>
<fully-connected> ::= layer:fc <activation-function> [num-units,int,1,128,2048] <bias> 
<activation-function> ::= act:linear | act:relu | act:sigmoid
<bias> ::= bias:True | bias:False
<softmax> ::= layer:fc act:softmax num-units:10 bias:True
<learning> ::= <gradient-descent> <early-stop> [batch_size,int,1,50,500] epochs:3 | <adam> <early-stop> [batch_size,int,1,50,500] epochs:3
<gradient-descent> ::= learning:gradient-descent [lr,float,1,0.0001,0.1] [momentum,float,1,0.68,0.99] [decay,float,1,0.000001,0.001] <nesterov>
<nesterov> ::= nesterov:True | nesterov:False
<adam> ::= learning:adam [lr,float,1,0.0001,0.1] [beta1,float,1,0.5,1] [beta2,float,1,0.5,1] [decay,float,1,0.000001,0.001]
<amsgrad> ::= amsgrad:True | amsgrad:False
<early-stop> ::= [early_stop,int,1,5,20]
"""


def test_fast_denser_example_parses_and_warns_unreachable():
    g = Grammar.from_text(FAST_DENSER_EXAMPLE, "fd.grammar")
    assert len(g.rules["features"]) == 6  # repeats kept: they weight the choice
    assert g.rules["early-stop"] == [(Range("early_stop", "int", 1, 5.0, 20.0),)]
    assert g.rules["bias"][0] == (Terminal("bias:True"),)
    with pytest.warns(GrammarWarning, match=r"fd.grammar:17:1: rule <amsgrad> is unreachable"):
        NetworkStructure().validate(g)


def test_comments_blank_lines_and_spaces_inside_ranges():
    g = Grammar.from_text("# header\n\n<a> ::= x:1 [n, int, 2, 0, 3]   # trailing\n")
    assert g.rules["a"] == [(Terminal("x:1"), Range("n", "int", 2, 0.0, 3.0))]


def test_recursive_grammar_terminates_within_depth():
    g = Grammar.from_text("<a> ::= <a> <a> | x:1\n")
    assert g.min_depth["a"] == 1
    assert g.alternatives_within("a", 1) == [1]
    assert g.alternatives_within("a", 5) == [0, 1]


def error_of(text):
    with pytest.raises(GrammarError) as info:
        Grammar.from_text(text, "bad.grammar")
    return info.value


@pytest.mark.parametrize("text, line, col, message", [
    ("<a> ::= <b>\n", 1, 9, "undefined non-terminal <b>"),
    ("<a> ::= x:1\n\n  <a> ::= x:2\n", 3, 3, "defined twice"),
    ("<a> ::= [n,double,1,0,1]\n", 1, 9, "type must be 'int' or 'float'"),
    ("<a> ::= x:1 [n,int,0,0,1]\n", 1, 13, "count must be >= 1"),
    ("<a> ::= [n,float,1,2,1]\n", 1, 9, "min 2 > max 1"),
    ("<a> ::= [n,int,1,2]\n", 1, 9, "expected 5 fields"),
    ("<a> ::= x:1 |  | x:2\n", 1, 16, "empty alternative"),
    ("<a> ::= x:1 |\n", 1, 14, "empty alternative"),
    ("<a> ::= x:1\n<b> ::= <b> x:1 | <c>\n<c> ::= <b>\n", 2, 1, "<b> can never terminate"),
    ("<a> ::= x:1\nnot a rule\n", 2, 1, "expected a rule"),
])
def test_error_kinds_carry_line_and_column(text, line, col, message):
    err = error_of(text)
    assert (err.line, err.col) == (line, col)
    assert message in err.message
    assert str(err).startswith(f"bad.grammar:{line}:{col}: ")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.grammar"
    path.write_bytes("<a> ::= x:1\n<b> ::= name:caf\xe9\n".encode("latin-1"))
    with pytest.raises(GrammarError) as info:
        Grammar.from_file(path)
    assert (info.value.line, info.value.col) == (2, 17)
    assert "not UTF-8" in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(GrammarError, match="cannot read grammar file"):
        Grammar.from_file(tmp_path / "nope.grammar")


def test_structure_naming_missing_rule_is_clear():
    g = Grammar.from_text("<features> ::= layer:conv\n<softmax> ::= layer:fc\n<learning> ::= lr:0.1\n")
    with pytest.raises(GrammarError, match="structure module <classification> is not defined"):
        NetworkStructure().validate(g)


def test_structure_from_config_accepts_fast_denser_keys():
    s = NetworkStructure.from_config({"network_structure": [["features", 2, 5]],
                                      "network_structure_init": {"features": [3]},
                                      "levels_back": {"features": 3}, "macro_structure": ["learning"]})
    assert (s.modules[0].min_layers, s.modules[0].max_layers, s.modules[0].init_layers,
            s.modules[0].levels_back) == (2, 5, [3], 3)
    with pytest.raises(ValueError, match="unknown"):
        NetworkStructure.from_config({"modulez": []})


# ------------------------------------------------------------ issue 10: edge cases
def chain(n: int, reverse: bool = False) -> str:
    lines = [f"<c{i}> ::= <c{i + 1}>" for i in range(n)] + [f"<c{n}> ::= x:1"]
    return "\n".join(reversed(lines) if reverse else lines) + "\n"


@pytest.mark.parametrize("reverse", [False, True])
def test_termination_analysis_is_linear_in_both_orders(reverse):
    # Quadratic before: 20 s in one order, 0.02 s in the other; now about 0.05 s either way.
    g = Grammar.from_text(chain(5000, reverse))
    assert g.min_depth["c0"] == 5001 and g.min_depth["c5000"] == 1


def test_a_derivation_deeper_than_the_limit_is_refused_at_the_start_rule():
    from nero_deap.space.grammar import MAX_DERIVATION_DEPTH

    text = "<features> ::= <c0>\n" + chain(1500) + "<classification> ::= layer:fc\n<softmax> ::= layer:fc\n" \
        "<learning> ::= lr:0.1\n"
    g = Grammar.from_text(text, "deep.grammar")
    with pytest.raises(GrammarError) as info:
        NetworkStructure().validate(g)
    assert str(info.value).startswith(f"deep.grammar:1:1: <features> needs 1502 nested rules")
    assert f"limit {MAX_DERIVATION_DEPTH}" in str(info.value)


def test_lines_end_only_at_newline():
    g = Grammar.from_text("# a\x0cb\n<a> ::= x\x0by \u2028 z\r\n# c\x1cd\x85e\n<b> ::= <a>\n")
    assert g.positions == {"a": (2, 1), "b": (4, 1)}
    assert [s.text for s in g.rules["a"][0]] == ["x", "y", "z"]
    err = error_of("# \u2028\n<a> ::= <nope>\n")
    assert (err.line, err.col) == (2, 9)


def test_classic_mac_line_endings_are_lines():
    """A file with only \\r line endings once read as one line: "grammar has no rules"."""
    g = Grammar.from_text("# a\r<a> ::= x | y\r<b> ::= <a>\r")
    assert g.positions == {"a": (2, 1), "b": (3, 1)}
    assert (error_of("<a> ::= x\r<b> ::= <nope>\r").line) == 2


def test_the_rule_that_never_terminates_is_blamed_not_its_user():
    err = error_of("<features> ::= <more>\n<more> ::= act:relu <more> | act:elu <more>\n")
    assert (err.line, err.col) == (2, 1) and "<more> can never terminate" in err.message


@pytest.mark.parametrize("text, message", [
    ("<a> ::= [lr,float,1,-1.7e308,1.7e308]\n", "max - min overflows a float"),
    ("<a> ::= [x,float,1000000000000,0,1]\n", "count must be >= 1 and <= 1024"),
])
def test_ranges_that_would_crash_the_run_are_grammar_errors(text, message):
    err = error_of(text)
    assert (err.line, err.col) == (1, 9) and message in err.message


@pytest.mark.parametrize("kind, why", [("device", "not a regular file"), ("directory", "a directory"),
                                       ("missing", "no such file")])
def test_grammar_files_must_be_regular_files(tmp_path, kind, why):
    path = {"device": "/dev/zero", "directory": str(tmp_path), "missing": str(tmp_path / "nope")}[kind]
    with pytest.raises(GrammarError) as info:
        Grammar.from_file(path)
    assert str(info.value) == f"{path}: cannot read grammar file: {why}"


def test_grammar_file_size_is_capped(tmp_path):
    from nero_deap.space.grammar import MAX_GRAMMAR_BYTES

    path = tmp_path / "big.grammar"
    path.write_text("#" * MAX_GRAMMAR_BYTES + "\n<a> ::= x\n")
    with pytest.raises(GrammarError, match="larger than"):
        Grammar.from_file(path)


def test_errors_tied_to_no_line_print_no_zero_position():
    g = Grammar.from_text("<features> ::= layer:conv\n<softmax> ::= layer:fc\n<learning> ::= lr:0.1\n", "g.grammar")
    with pytest.raises(GrammarError) as info:
        NetworkStructure().validate(g)
    assert str(info.value).startswith("g.grammar: structure module <classification>")
