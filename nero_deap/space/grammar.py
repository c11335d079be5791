"""DSGE grammars in Fast-DENSER syntax.

A grammar file has one rule per line::

    # comment
    <features>    ::= <convolution> | <convolution> | <pooling>
    <convolution> ::= layer:conv [num-filters,int,1,32,256] <activation>
    <activation>  ::= act:relu | act:elu

* ``<x>`` is a non-terminal, ``key:value`` (or any other bare word) a terminal.
* ``[name,int|float,count,min,max]`` is a numeric parameter: ``count`` values,
  ints drawn inclusively from ``[min, max]``, floats uniformly.
* A repeated alternative weights the random choice (choice is by index).

Every grammar written for Fast-DENSER parses unchanged.  Errors raise
:class:`GrammarError` with file, line and column; an unreachable rule only
warns (Fast-DENSER's own example grammar has one, ``<amsgrad>``).

Limits (each a ``file:line:col`` error, so a hostile or mistyped grammar
fails at load time instead of exhausting memory or the stack in the run):
a file of at most :data:`MAX_GRAMMAR_BYTES` that is a regular file; a range
of at most :data:`MAX_RANGE_COUNT` values whose ``max - min`` is a finite
float and whose name has no whitespace or ``:`` (a phenotype's ``key:value`` text must read back); a
learning number (``lr``, ``momentum``, ``decay``, ...: :data:`~nero_deap.space.dialect.LEARNING_NUMBERS`),
as a terminal or a range, that training can use; and, for the rules a network structure starts from, a derivation
within :data:`MAX_DERIVATION_DEPTH` nested rules (:meth:`Grammar.require_shallow`).  Lines end at
``\\n`` only (``\\r\\n`` too; ``\\r`` in a file without ``\\n``), never at form feeds or Unicode line
separators, so reported positions match what editors show.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

from .dialect import learning_number, learning_number_problem
from .phenotype import parse_value

MAX_GRAMMAR_BYTES = 1 << 20  # 1 MiB: Fast-DENSER's grammars are about 2 KB
MAX_RANGE_COUNT = 1024  # values one [name,type,count,min,max] gene may hold
MAX_DERIVATION_DEPTH = 256  # nested rules one derivation may need (the mapper recurses per level)


class GrammarError(ValueError):
    """A grammar (or a structure checked against it) is invalid.

    ``str(err)`` is ``file:line:col: message``, the form editors understand.
    """

    def __init__(self, message: str, file: str = "<grammar>", line: int = 0, col: int = 0):
        self.message, self.file, self.line, self.col = message, file, line, col
        where = f"{file}:{line}:{col}" if line else file  # no ':0:0:' for errors tied to no line
        super().__init__(f"{where}: {message}")


class GrammarWarning(UserWarning):
    """Something legal but probably unintended, e.g. an unreachable rule."""


@dataclass(frozen=True)
class NonTerminal:
    name: str


@dataclass(frozen=True)
class Terminal:
    text: str


@dataclass(frozen=True)
class Range:
    """``[name,type,count,min,max]``: a numeric gene of ``count`` values."""

    name: str
    kind: str  # "int" or "float"
    count: int
    low: float
    high: float

    def sample(self, rng) -> list:
        if self.kind == "int":
            return [rng.randint(int(self.low), int(self.high)) for _ in range(self.count)]
        return [rng.uniform(self.low, self.high) for _ in range(self.count)]

    def contains(self, values: list) -> bool:
        if len(values) != self.count:
            return False
        if self.kind == "int":
            return all(isinstance(v, int) and self.low <= v <= self.high for v in values)
        return all(isinstance(v, float) and self.low <= v <= self.high for v in values)

    def __str__(self) -> str:
        return f"[{self.name},{self.kind},{self.count},{_num(self.low)},{_num(self.high)}]"


Symbol = Union[NonTerminal, Terminal, Range]
Alternative = tuple  # tuple[Symbol, ...]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_TOKEN = re.compile(r"\[[^\]]*\]|[^\s\[]+|\[")
_NT = re.compile(r"^<([^<>\s]+)>$")


@dataclass
class Grammar:
    """Parsed grammar: ``rules[nt]`` is the list of alternatives (with repeats)."""

    rules: dict
    source: str = "<grammar>"
    positions: dict = None  # nt -> (line, col) of its definition
    terminals: dict = None  # terminal text -> (line, col) of its first use

    # ------------------------------------------------------------------ parse
    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Grammar":
        path = Path(path)
        try:
            if not path.is_file():  # /dev/zero, a FIFO or a directory would never end or make sense
                what = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
                raise GrammarError(f"cannot read grammar file: {what}", str(path))
            with open(path, "rb") as f:
                raw = f.read(MAX_GRAMMAR_BYTES + 1)
        except OSError as exc:
            raise GrammarError(f"cannot read grammar file: {exc.strerror or exc}", str(path), 0, 0) from None
        if len(raw) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"grammar file is larger than {MAX_GRAMMAR_BYTES} bytes", str(path))
        try:
            text = raw.decode("utf-8-sig")  # tolerate a byte-order mark
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise GrammarError("file is not UTF-8 text", str(path), line, col) from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<grammar>") -> "Grammar":
        rules: dict = {}
        positions: dict = {}
        uses: list = []  # (nt, line, col) of every non-terminal use
        terminals: dict = {}  # text -> (line, col) of its first use
        if "\r" in text and "\n" not in text:  # classic Mac OS line endings: editors show lines, so do we
            text = text.replace("\r", "\n")
        for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: see the module docstring
            line = line.removesuffix("\r")
            stripped = line.split("#", 1)[0]
            if not stripped.strip():
                continue
            if "\x00" in line:
                raise GrammarError("file is not text (NUL byte)", source, lineno, line.index("\x00") + 1)
            if "::=" not in stripped:
                col = len(line) - len(line.lstrip()) + 1
                raise GrammarError("expected a rule '<name> ::= alternatives'", source, lineno, col)
            head, body = stripped.split("::=", 1)
            head_col = len(head) - len(head.lstrip()) + 1
            match = _NT.match(head.strip())
            if not match:
                raise GrammarError(f"expected a non-terminal like <name> before '::=', got {head.strip()!r}",
                                   source, lineno, head_col)
            name = match.group(1)
            if name in rules:
                first = positions[name][0]
                raise GrammarError(f"rule <{name}> defined twice (first on line {first})", source, lineno, head_col)
            positions[name] = (lineno, head_col)
            body_start = len(head) + 3
            alternatives = []
            offset = body_start
            for part in body.split("|"):
                alt_col = offset + 1 + (len(part) - len(part.lstrip()))
                if not part.strip():
                    raise GrammarError(f"empty alternative in rule <{name}>", source, lineno, alt_col)
                symbols = []
                for token in _TOKEN.finditer(part):
                    col = offset + token.start() + 1
                    symbols.append(_parse_symbol(token.group(0), source, lineno, col))
                    if isinstance(symbols[-1], NonTerminal):
                        uses.append((symbols[-1].name, lineno, col))
                    elif isinstance(symbols[-1], Terminal) and symbols[-1].text not in terminals:
                        _check_learning_terminal(symbols[-1].text, source, lineno, col)
                        terminals[symbols[-1].text] = (lineno, col)
                alternatives.append(tuple(symbols))
                offset += len(part) + 1
            rules[name] = alternatives
        if not rules:
            raise GrammarError("grammar has no rules", source, 1, 1)
        for nt, lineno, col in uses:
            if nt not in rules:
                raise GrammarError(f"undefined non-terminal <{nt}>", source, lineno, col)
        grammar = cls(rules, source, positions, terminals)
        grammar._check_termination()
        return grammar

    # -------------------------------------------------------------- analysis
    def _check_termination(self) -> None:
        """Compute each rule's minimum derivation depth; infinite = never ends.

        Linear in the grammar's size (Knuth's generalisation of Dijkstra to
        grammars): an alternative's depth is known once every non-terminal in
        it is, and depths become known in increasing order, so a FIFO queue
        suffices.  The rule blamed for non-termination is one that only
        recurses among never-ending rules, not a rule that merely uses one.
        """
        depth = {nt: math.inf for nt in self.rules}
        waiting = {}  # (nt, alternative index) -> uses of not-yet-finished non-terminals in it
        users: dict = {nt: [] for nt in self.rules}  # nt -> alternatives that use it, once per use
        queue: list = []  # (depth, nt), depths never decreasing along the list
        for nt, alts in self.rules.items():
            for i, alt in enumerate(alts):
                names = [s.name for s in alt if isinstance(s, NonTerminal)]
                waiting[nt, i] = len(names)
                for name in names:
                    users[name].append((nt, i))
                if not names:
                    queue.append((1, nt))
        head = 0
        while head < len(queue):
            d, nt = queue[head]
            head += 1
            if depth[nt] != math.inf:
                continue
            depth[nt] = d
            for key in users[nt]:
                waiting[key] -= 1
                if waiting[key] == 0:  # every symbol of that alternative is done; nt was the deepest
                    queue.append((d + 1, key[0]))
        self.min_depth = depth
        endless = [nt for nt in self.rules if depth[nt] == math.inf]
        if endless:
            cycle = _closed_cycle(endless, self.rules)
            nt = min(cycle, key=lambda n: self.positions[n])
            others = sorted(set(cycle) - {nt}, key=lambda n: self.positions[n])
            via = f", through {', '.join(f'<{n}>' for n in others)}" if others else ""
            line, col = self.positions[nt]
            raise GrammarError(f"non-terminal <{nt}> can never terminate (every alternative recurses{via})",
                               self.source, line, col)

    @staticmethod
    def _alt_depth(alt: Alternative, depth: dict) -> float:
        return 1 + max((depth[s.name] for s in alt if isinstance(s, NonTerminal)), default=0)

    def alternatives_within(self, nt: str, max_depth: float) -> list:
        """Indices of ``nt``'s alternatives whose derivation fits in ``max_depth`` levels.

        DSGE's rule for recursion: past the depth limit only alternatives
        that can still terminate are allowed.  Never empty: if the limit is
        too tight for every alternative, the shallowest ones are returned.
        """
        alts = self.rules[nt]
        depths = [self._alt_depth(a, self.min_depth) for a in alts]
        allowed = [i for i, d in enumerate(depths) if d <= max_depth]
        if not allowed:
            shallowest = min(depths)
            allowed = [i for i, d in enumerate(depths) if d == shallowest]
        return allowed

    def derivable(self, rules: Iterable[str], own: Callable[[Symbol], Iterable]) -> dict:
        """Rule -> the set of ``own(symbol)`` over every terminal and range its derivations can contain.

        Only rules in ``rules`` count (a non-terminal outside them adds nothing): the least solution of
        ``value[nt] = own(symbol) for each terminal or range, and value[m] for each non-terminal m in
        nt's alternatives``.  Linear in the grammar's size (times the sets' size), where a fixpoint loop
        repeats once per level of a rule chain: the rules of one strongly connected component share one
        value, and Tarjan's algorithm finishes each component after every component it uses.
        """
        inside = set(rules)
        order = [nt for nt in self.rules if nt in inside]
        edges = {nt: [s.name for alt in self.rules[nt] for s in alt if isinstance(s, NonTerminal) and s.name in inside]
                 for nt in order}
        value: dict = {}
        for component in _strong_components(order, edges):
            found: set = set()
            for nt in component:
                for alt in self.rules[nt]:
                    for symbol in alt:
                        if not isinstance(symbol, NonTerminal):
                            found.update(own(symbol))
                        elif symbol.name in value:  # a finished component's (the component's own are not yet)
                            found |= value[symbol.name]
            for nt in component:
                value[nt] = set(found)
        return value

    def reachable(self, starts: Iterable[str]) -> set:
        seen, stack = set(), [s for s in starts if s in self.rules]
        while stack:
            nt = stack.pop()
            if nt in seen:
                continue
            seen.add(nt)
            for alt in self.rules[nt]:
                stack.extend(s.name for s in alt if isinstance(s, NonTerminal))
        return seen

    def warn_unreachable(self, starts: Iterable[str]) -> list:
        """Warn (not fail) about rules no start symbol can reach; return their names."""
        reachable = self.reachable(starts)  # once: per rule, a chain of rules took quadratic time
        unreachable = [nt for nt in self.rules if nt not in reachable]
        for nt in unreachable:
            line, col = self.positions[nt]
            warnings.warn(f"{self.source}:{line}:{col}: rule <{nt}> is unreachable", GrammarWarning, stacklevel=2)
        return unreachable

    def terminal_position(self, text: str) -> tuple:
        """(line, col) of the first use of terminal ``text``; (0, 0) if unknown."""
        return (self.terminals or {}).get(text, (0, 0))

    def require_shallow(self, nt: str, limit: int = None) -> None:
        """Refuse a start rule whose shortest derivation nests more than ``limit`` rules.

        The mapper recurses once per level; past this limit a run would die of
        ``RecursionError`` instead of reporting the rule.
        """
        limit = MAX_DERIVATION_DEPTH if limit is None else limit
        if self.min_depth[nt] > limit:
            line, col = self.positions[nt]
            raise GrammarError(f"<{nt}> needs {self.min_depth[nt]} nested rules to derive anything "
                               f"(limit {limit})", self.source, line, col)

    def require(self, nt: str, what: str) -> None:
        """Raise a clear error when a structure names a rule the grammar lacks."""
        if nt not in self.rules:
            known = ", ".join(f"<{n}>" for n in self.rules)
            raise GrammarError(f"{what} <{nt}> is not defined in the grammar (rules: {known})", self.source, 0, 0)

    def __str__(self) -> str:
        lines = []
        for nt, alts in self.rules.items():
            body = " | ".join(" ".join(_symbol_text(s) for s in alt) for alt in alts)
            lines.append(f"<{nt}> ::= {body}")
        return "\n".join(lines) + "\n"


def _closed_cycle(endless: list, rules: dict) -> list:
    """A set of never-ending rules that only use each other: a sink component of the use graph.

    Every never-ending rule uses another one, so following uses must close a
    cycle; the first strongly connected component Tarjan's algorithm finishes
    (iterative here: chains can be thousands of rules long) has no way out.
    """
    inside = set(endless)
    edges = {nt: sorted({s.name for alt in rules[nt] for s in alt
                         if isinstance(s, NonTerminal) and s.name in inside}) for nt in endless}
    for component in _strong_components(endless, edges):
        return component
    raise AssertionError("unreachable: a never-ending rule always closes a cycle")


def _strong_components(nodes: list, edges: dict):
    """Tarjan's strongly connected components of ``edges`` (node -> successors), searched from ``nodes`` in
    order; each component is yielded after every component it reaches.  Iterative: chains can be thousands
    of rules long."""
    index, low, on_stack, stack = {}, {}, set(), []
    for start in nodes:
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(edges[start]))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                yield component


def _symbol_text(sym: Symbol) -> str:
    if isinstance(sym, NonTerminal):
        return f"<{sym.name}>"
    if isinstance(sym, Terminal):
        return sym.text
    return str(sym)


def _check_learning_terminal(text: str, source: str, line: int, col: int) -> None:
    """Refuse a ``key:value`` terminal giving a learning number training cannot use (``lr:-1``, ``momentum:p.9``)."""
    if ":" in text:
        key, value = text.split(":", 1)
        problem = learning_number_problem(key, parse_value(value))
        if problem:
            raise GrammarError(f"{text}: {problem}", source, line, col)


def _parse_symbol(token: str, source: str, line: int, col: int) -> Symbol:
    if token.startswith("<"):
        match = _NT.match(token)
        if not match:
            raise GrammarError(f"malformed non-terminal {token!r}", source, line, col)
        return NonTerminal(match.group(1))
    if token.startswith("["):
        return _parse_range(token, source, line, col)
    if ">" in token or "<" in token:
        raise GrammarError(f"malformed symbol {token!r}", source, line, col)
    return Terminal(token)


def _parse_range(token: str, source: str, line: int, col: int) -> Range:
    if not token.endswith("]"):
        raise GrammarError(f"unclosed range {token!r}: expected [name,int|float,count,min,max]", source, line, col)
    fields = [f.strip() for f in token[1:-1].split(",")]
    if len(fields) != 5:
        raise GrammarError(f"malformed range {token!r}: expected 5 fields [name,int|float,count,min,max], "
                           f"got {len(fields)}", source, line, col)
    name, kind, count, low, high = fields
    if not name:
        raise GrammarError(f"malformed range {token!r}: empty name", source, line, col)
    if ":" in name or any(c.isspace() for c in name):  # the phenotype's text, name:value ..., would not read back
        raise GrammarError(f"malformed range {token!r}: name {name!r} has whitespace or ':'", source, line, col)
    if kind not in ("int", "float"):
        raise GrammarError(f"malformed range {token!r}: type must be 'int' or 'float', got {kind!r}",
                           source, line, col)
    try:
        count_value = int(count)
    except ValueError:
        raise GrammarError(f"malformed range {token!r}: count {count!r} is not an integer",
                           source, line, col) from None
    if not 1 <= count_value <= MAX_RANGE_COUNT:
        raise GrammarError(f"malformed range {token!r}: count must be >= 1 and <= {MAX_RANGE_COUNT}, "
                           f"got {count_value}", source, line, col)
    try:
        low_value, high_value = float(low), float(high)
    except ValueError:
        raise GrammarError(f"malformed range {token!r}: min and max must be numbers", source, line, col) from None
    if not (math.isfinite(low_value) and math.isfinite(high_value)):
        raise GrammarError(f"malformed range {token!r}: min and max must be finite", source, line, col)
    if kind == "int" and not (low_value.is_integer() and high_value.is_integer()):
        raise GrammarError(f"malformed range {token!r}: int range needs integer bounds", source, line, col)
    if low_value > high_value:
        raise GrammarError(f"malformed range {token!r}: min {low} > max {high}", source, line, col)
    if not math.isfinite(high_value - low_value):  # uniform sampling computes min + (max - min) * u
        raise GrammarError(f"malformed range {token!r}: max - min overflows a float", source, line, col)
    if learning_number(name) and count_value != 1:
        raise GrammarError(f"malformed range {token!r}: {name} takes one number, the range gives {count_value}",
                           source, line, col)
    for bound in (low_value, high_value):  # the allowed values are intervals: both bounds in, every value in
        problem = learning_number_problem(name, bound)
        if problem:
            raise GrammarError(f"malformed range {token!r}: {problem}", source, line, col)
    return Range(name, kind, count_value, low_value, high_value)
