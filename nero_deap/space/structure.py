"""The macro level: which modules a network has, in what order and how big.

Defaults are Fast-DENSER's (``features`` 1-30 layers starting with 2-4,
``classification`` 1-10 starting with 1, levels back 1, output ``softmax``,
macro ``learning``).  A TOML run config overrides them under ``[structure]``;
Fast-DENSER's own key names (``network_structure``,
``network_structure_init``, ``macro_structure``) are accepted too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .grammar import MAX_DERIVATION_DEPTH, Grammar


def _integer(key: str, value) -> int:
    """``value`` as an int, or an error naming ``key`` (not "invalid literal for int()")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _table(cfg: dict, *keys: str) -> dict:
    for key in keys:
        if key in cfg:
            if not isinstance(cfg[key], dict):
                raise ValueError(f"structure.{key} must be a table, e.g. {{ features = 3 }}, got {cfg[key]!r}")
            return cfg[key]
    return {}


@dataclass
class ModuleSpec:
    name: str  # the grammar non-terminal each layer is derived from
    min_layers: int
    max_layers: int
    init_layers: list
    levels_back: int = 1


@dataclass
class NetworkStructure:
    modules: list = field(default_factory=lambda: [
        ModuleSpec("features", 1, 30, [2, 3, 4], 1),
        ModuleSpec("classification", 1, 10, [1], 1),
    ])
    output: str = "softmax"
    macro: list = field(default_factory=lambda: ["learning"])
    max_depth: int = 10  # DSGE derivation depth limit for recursive grammars

    @classmethod
    def from_config(cls, cfg: dict) -> "NetworkStructure":
        """Build from a ``[structure]`` table; missing keys keep the defaults."""
        default = cls()
        cfg = dict(cfg or {})
        known = {"modules", "network_structure", "init", "network_structure_init", "levels_back",
                 "output", "macro", "macro_structure", "max_depth"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown [structure] key(s): {', '.join(sorted(unknown))}")
        raw_modules = cfg.get("modules", cfg.get("network_structure"))
        init = _table(cfg, "init", "network_structure_init")
        levels = _table(cfg, "levels_back")
        if raw_modules is None:
            modules = default.modules
        else:
            if not isinstance(raw_modules, (list, tuple)):
                raise ValueError(f"structure.modules must be a list of [name, min, max], got {raw_modules!r}")
            modules = []
            for entry in raw_modules:
                if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                    raise ValueError(f"structure module {entry!r} must be [name, min, max]")
                name, lo, hi = entry
                lo = _integer(f"structure.modules {name} min", lo)
                modules.append(ModuleSpec(str(name), lo, _integer(f"structure.modules {name} max", hi), [lo], 1))
        for spec in modules:
            if spec.name in init:
                value = init[spec.name]
                spec.init_layers = [_integer(f"structure.init.{spec.name}", v)
                                    for v in (value if isinstance(value, list) else [value])]
            if spec.name in levels:
                spec.levels_back = _integer(f"structure.levels_back.{spec.name}", levels[spec.name])
        macro = cfg.get("macro", cfg.get("macro_structure", default.macro))
        if not (isinstance(macro, list) and all(isinstance(m, str) for m in macro)):
            raise ValueError(f"structure.macro must be a list of rule names, got {macro!r}")
        return cls(
            modules=modules,
            output=str(cfg.get("output", default.output)),
            macro=list(macro),
            max_depth=_integer("structure.max_depth", cfg.get("max_depth", default.max_depth)),
        ).check()

    def adapt_defaults(self, grammar: Grammar, explicit: dict) -> list:
        """Fit defaults the user did not set to common grammar conventions; return notes.

        An output rule named ``<output>`` stands in for ``<softmax>``, a grammar
        without ``<classification>`` gets a features-only structure (global
        average pooling feeds the output layer), and a grammar without
        ``<learning>`` trains with the default optimiser.
        """
        notes = []
        if not ({"modules", "network_structure"} & set(explicit)) and "classification" not in grammar.rules \
                and [m.name for m in self.modules] == ["features", "classification"]:
            self.modules = [m for m in self.modules if m.name != "classification"]
            notes.append("the grammar has no <classification> rule: networks are <features> layers, "
                         "then the output layer")
        if "output" not in explicit and self.output not in grammar.rules and "output" in grammar.rules:
            self.output = "output"
            notes.append("using <output> as the output rule (the grammar has no <softmax>)")
        if not ({"macro", "macro_structure"} & set(explicit)) and self.macro == ["learning"] \
                and "learning" not in grammar.rules:
            self.macro = []
            notes.append("the grammar has no <learning> rule: candidates train with SGD defaults")
        return notes

    def to_config(self) -> dict:
        return {
            "modules": [[m.name, m.min_layers, m.max_layers] for m in self.modules],
            "init": {m.name: list(m.init_layers) for m in self.modules},
            "levels_back": {m.name: m.levels_back for m in self.modules},
            "output": self.output,
            "macro": list(self.macro),
            "max_depth": self.max_depth,
        }

    def check(self) -> "NetworkStructure":
        """``self`` if its numbers are consistent (a ValueError otherwise); needs no grammar, so a bad
        ``[structure]`` value is reported with the config file it came from."""
        if not self.modules:
            raise ValueError("structure has no modules")
        for m in self.modules:
            if not 1 <= m.min_layers <= m.max_layers:
                raise ValueError(f"structure module <{m.name}>: need 1 <= min ({m.min_layers}) <= max ({m.max_layers})")
            bad = [n for n in m.init_layers if not m.min_layers <= n <= m.max_layers]
            if bad or not m.init_layers:
                raise ValueError(f"structure module <{m.name}>: initial layer counts {m.init_layers} must lie in "
                                 f"[{m.min_layers}, {m.max_layers}]")
            if m.levels_back < 1:
                raise ValueError(f"structure module <{m.name}>: levels_back must be >= 1")
        if not 1 <= self.max_depth <= MAX_DERIVATION_DEPTH:
            raise ValueError(f"structure.max_depth must be in [1, {MAX_DERIVATION_DEPTH}], got {self.max_depth}")
        return self

    def validate(self, grammar: Grammar) -> None:
        """Check the structure against the grammar (its rules exist and are shallow enough); warn about
        unreachable rules.  Its numbers were checked by :meth:`check` when it was built."""
        for m in self.modules:
            grammar.require(m.name, "structure module")
        grammar.require(self.output, "structure output")
        for nt in self.macro:
            grammar.require(nt, "structure macro")
        for nt in [m.name for m in self.modules] + [self.output] + list(self.macro):
            grammar.require_shallow(nt)
        grammar.warn_unreachable([m.name for m in self.modules] + [self.output] + list(self.macro))
