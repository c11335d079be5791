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
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union


class GrammarError(ValueError):
    """A grammar (or a structure checked against it) is invalid.

    ``str(err)`` is ``file:line:col: message``, the form editors understand.
    """

    def __init__(self, message: str, file: str = "<grammar>", line: int = 0, col: int = 0):
        self.message, self.file, self.line, self.col = message, file, line, col
        super().__init__(f"{file}:{line}:{col}: {message}")


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

    # ------------------------------------------------------------------ parse
    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Grammar":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise GrammarError(f"cannot read grammar file: {exc.strerror or exc}", str(path), 0, 0) from None
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
        for lineno, line in enumerate(text.splitlines(), start=1):
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
                alternatives.append(tuple(symbols))
                offset += len(part) + 1
            rules[name] = alternatives
        if not rules:
            raise GrammarError("grammar has no rules", source, 1, 1)
        for nt, lineno, col in uses:
            if nt not in rules:
                raise GrammarError(f"undefined non-terminal <{nt}>", source, lineno, col)
        grammar = cls(rules, source, positions)
        grammar._check_termination()
        return grammar

    # -------------------------------------------------------------- analysis
    def _check_termination(self) -> None:
        """Compute each rule's minimum derivation depth; infinite = never ends."""
        depth = {nt: math.inf for nt in self.rules}
        changed = True
        while changed:
            changed = False
            for nt, alts in self.rules.items():
                best = min(self._alt_depth(alt, depth) for alt in alts)
                if best < depth[nt]:
                    depth[nt], changed = best, True
        self.min_depth = depth
        for nt, d in depth.items():
            if d == math.inf:
                line, col = self.positions[nt]
                raise GrammarError(f"non-terminal <{nt}> can never terminate (every alternative recurses)",
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
        unreachable = [nt for nt in self.rules if nt not in self.reachable(starts)]
        for nt in unreachable:
            line, col = self.positions[nt]
            warnings.warn(f"{self.source}:{line}:{col}: rule <{nt}> is unreachable", GrammarWarning, stacklevel=2)
        return unreachable

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


def _symbol_text(sym: Symbol) -> str:
    if isinstance(sym, NonTerminal):
        return f"<{sym.name}>"
    if isinstance(sym, Terminal):
        return sym.text
    return str(sym)


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
    if kind not in ("int", "float"):
        raise GrammarError(f"malformed range {token!r}: type must be 'int' or 'float', got {kind!r}",
                           source, line, col)
    try:
        count_value = int(count)
    except ValueError:
        raise GrammarError(f"malformed range {token!r}: count {count!r} is not an integer",
                           source, line, col) from None
    if count_value < 1:
        raise GrammarError(f"malformed range {token!r}: count must be >= 1, got {count_value}", source, line, col)
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
    return Range(name, kind, count_value, low_value, high_value)
