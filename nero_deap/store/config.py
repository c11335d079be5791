"""The run configuration: defaults, a TOML file, then command-line overrides.

Top-level keys are :class:`RunConfig`'s fields; ``[structure]`` and
``[variation]`` tables go to :class:`~nero_deap.space.structure.NetworkStructure`
and :class:`~nero_deap.space.operators.VariationRates`.  The resolved config is
written to ``runs/<name>/config.toml`` so a run can be reproduced or resumed;
:func:`check_resume` refuses a resume that would change what the run means.

Options that name an entry of a search-layer registry (objectives,
algorithm, masking mode, fidelity, audit attack) are checked against the
names the caller hands to :meth:`RunConfig.validate`
(:func:`nero_deap.search.options.option_checks`): this module sits above the
search in the layering but does not import it, so adding an algorithm or an
objective touches only its own registry.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Optional, Union

from ..common.errors import ConfigError
from ..engine.threat import EPS
from ..space.operators import VariationRates
from ..space.structure import NetworkStructure

# A run option's rule: the names it may take, or a function that raises ValueError (with the reason) on a bad value
Choice = Union[Collection[str], Callable[[str], object]]

# What a resumed run may change: how long it runs, where, on which machine, and which weight files it keeps.
# Everything else (data, grammar, seed, population, training budget, accelerate's bf16 numerics, ...) changes
# what the run means, so --resume refuses it.
RESUME_MAY_CHANGE = ("generations", "out", "device", "threads", "workers_per_gpu", "save_weights")
ACCELERATE = {"auto": None, "on": True, "off": False}  # value -> TrainSettings.accelerate
SAVE_WEIGHTS = ("front", "all", "none")
MAX_SEED = 2**32 - 1  # numpy's seed range; torch and random accept it too


# Far above any real run, low enough that a typo (1e9) is an error, not a machine out of memory.
MAX_POPULATION = 65536
MAX_GENERATIONS = 1_000_000
MAX_THREADS = 1024


@dataclass
class RunConfig:
    grammar: str = "grammars/cnn.grammar"
    data: str = "cifar10"
    out: str = ""  # default: runs/<grammar stem>-seed<seed>
    population: int = 20
    generations: int = 10
    epochs: float = 5.0
    max_seconds: float = 0.0  # wall-clock cap per candidate, 0 = none
    seed: int = 0
    device: str = "auto"
    eps: float = EPS
    min_clean: float = 0.0  # tau of the clean-accuracy constraint, 0 = off
    cxpb: float = 0.5
    mutpb: float = 1.0
    val_size: int = 0  # 0 = 5000 on CIFAR-10 (1/5 of train on small data)
    train_subset: int = 0  # 0 = the whole training split
    split_seed: int = 0
    workers_per_gpu: int = 1
    threads: int = 0  # torch CPU threads per worker, 0 = torch's default
    accelerate: str = "auto"  # bf16 autocast + channels_last: auto (= on CUDA), on, off
    save_weights: str = "front"  # keep trained weights of: front (the Pareto archive), all, none
    objectives: str = "clean,fgsm"  # comma list of objective names (two or more); NERO-Net's pair
    algorithm: str = "nsga2"  # nsga2 | random (nero_deap.search.evolution.ALGORITHMS)
    audit: str = "pgd20"  # masking audit attack on archive entrants (a robust objective name), or none
    masking: str = "flag"  # flag | penalise (nero_deap.search.audit)
    mask_threshold: float = 0.10  # flag when a robustness objective exceeds the audit accuracy by more
    audit_n: int = 1000  # audit on this many validation images (a fixed seeded sample; 0 = all)
    fidelity: str = "full"  # full | halving (nero_deap.search.fidelity)
    halving_budget: float = 1 / 3  # halving: share of the budget every new candidate trains before the cut
    halving_keep: float = 0.5  # halving: share of them (by non-dominated rank) that train on to the full budget
    structure: dict = field(default_factory=dict)
    variation: dict = field(default_factory=dict)

    def validate(self, choices: Mapping[str, Choice]) -> "RunConfig":
        """``self`` if every value is in range and each key of ``choices`` holds a value its rule accepts
        (:func:`nero_deap.search.options.option_checks`); else a :class:`ConfigError` carrying the failing key."""
        checks = [("population", 4 <= self.population <= MAX_POPULATION and self.population % 4 == 0,
                   f"a positive multiple of 4 (NSGA-II's selTournamentDCD), at most {MAX_POPULATION}"),
                  ("generations", 0 <= self.generations <= MAX_GENERATIONS, f"in [0, {MAX_GENERATIONS}]"),
                  ("epochs", 0 < self.epochs < math.inf, "> 0 and finite"),
                  ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
                  ("split_seed", 0 <= self.split_seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
                  ("eps", 0 <= self.eps <= 1, "in [0, 1]"), ("min_clean", 0 <= self.min_clean <= 1, "in [0, 1]"),
                  ("cxpb", 0 <= self.cxpb <= 1, "in [0, 1]"), ("mutpb", 0 <= self.mutpb <= 1, "in [0, 1]"),
                  ("max_seconds", self.max_seconds >= 0, ">= 0"), ("val_size", self.val_size >= 0, ">= 0"),
                  ("train_subset", self.train_subset >= 0, ">= 0"),
                  ("workers_per_gpu", 1 <= self.workers_per_gpu <= MAX_THREADS, f"in [1, {MAX_THREADS}]"),
                  ("threads", 0 <= self.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}]")]
        check_ranges([(name, getattr(self, name), ok, expected) for name, ok, expected in checks])
        check_choices(self, (("accelerate", ACCELERATE), ("save_weights", SAVE_WEIGHTS)))
        self.check_tables()
        self.check_search_options(choices)
        check_device_name(self.device)
        return self

    def check_tables(self) -> None:
        """``[structure]`` and ``[variation]`` hold values the search can build (what the grammar must
        also allow is checked when it is read)."""
        for key, build in (("structure", NetworkStructure.from_config), ("variation", VariationRates.from_config)):
            try:
                build(getattr(self, key))
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), key) from None

    def check_search_options(self, choices: Mapping[str, Choice]) -> None:
        """Keys that name registry entries (``choices``), and the search's numeric settings."""
        for key, rule in choices.items():
            value = getattr(self, key)
            if callable(rule):
                try:
                    rule(value)
                except ValueError as exc:
                    raise ConfigError(str(exc), key) from None
            else:
                check_choices(self, ((key, tuple(rule)),))
        check_ranges([("audit_n", self.audit_n, self.audit_n >= 0, ">= 0"),
                      ("mask_threshold", self.mask_threshold, 0 <= self.mask_threshold <= 1, "in [0, 1]"),
                      ("halving_budget", self.halving_budget, 0 < self.halving_budget < 1, "in (0, 1)"),
                      ("halving_keep", self.halving_keep, 0 < self.halving_keep <= 1, "in (0, 1]")])

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{Path(self.grammar).stem}-seed{self.seed}"

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(asdict(self))


def check_device_name(device: str) -> None:
    """``--device`` names auto, cpu, cuda or cuda:N (whether this machine has it is checked where it is used)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}", "device")


def resume_changes(saved: "RunConfig", requested: "RunConfig", tables: bool = True) -> list:
    """``key (old -> new)`` for each key a resume would change that :data:`RESUME_MAY_CHANGE` does not allow.

    Both sides are compared as ``config.toml`` stores them, table keys one by
    one (``structure.max_depth``), so equal values spelt differently agree.
    ``tables=False`` skips the tables: before the grammar is read they are
    not yet resolved.
    """
    old, new = (tomllib.loads(cfg.to_toml()) for cfg in (saved, requested))
    changes = []
    for key in (f.name for f in fields(RunConfig) if f.name not in RESUME_MAY_CHANGE):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if not tables:
                continue
            changes += [f"{key}.{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(a.keys() | b.keys())
                        if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{key} ({a!r} -> {b!r})")
    return changes


def check_resume(run_dir: Path, requested: "RunConfig", tables: bool = True) -> None:
    """Refuse (ConfigError) a resume of ``run_dir`` whose configuration differs from the saved one."""
    saved_path = Path(run_dir) / "config.toml"
    if not saved_path.exists():
        raise ConfigError(f"--resume {run_dir}: no config.toml there")
    changes = resume_changes(merge(RunConfig(), load_run_config(saved_path), str(saved_path)), requested, tables)
    if changes:
        allowed = ", ".join(key for key in RESUME_MAY_CHANGE if key != "out")
        raise ConfigError(f"--resume {run_dir}: a resumed run keeps its configuration, but this changes "
                          f"{'; '.join(changes)} (only {allowed} may change)")


# what each kind of key takes: TOML's own types, no conversions (true is not 1, "4" is not 4, a list is no path)
ACCEPTED_TYPES = {int: (int, float), float: (int, float), str: (str,)}


def _from_command_line(value, kind):
    """``--set`` words that are not TOML (``.5``, ``1.``) arrive as text, as the shell gives them: convert."""
    if kind is str:
        return str(value)
    number = float(value) if isinstance(value, str) else value
    if kind is int and not float(number).is_integer():
        raise ValueError(number)
    return kind(number)


def _coerce(name: str, value, kind, source: str = "config"):
    """``value`` as a ``kind`` key takes it: from a file only TOML's own types; from the command line, the text
    the shell gives converted too; never a bool."""
    if kind not in ACCEPTED_TYPES:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        return value
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        if source == "command line" and isinstance(value, (str, int, float)):
            return _from_command_line(value, kind)
        if not isinstance(value, ACCEPTED_TYPES[kind]) or (kind is int and not float(value).is_integer()):
            raise ValueError(value)
        return kind(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{source}: {name} must be {'a whole number' if kind is int else kind.__name__}, "
                          f"got {value!r}") from None


def check_ranges(checks: list) -> None:
    """``checks``: (name, value, ok, expected) tuples; the first not ``ok`` is a :class:`ConfigError`."""
    for name, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name} must be {expected}, got {value!r}", name)


def check_choices(values: object, choices: Iterable) -> None:
    """``choices``: (attribute, allowed names) pairs; an attribute of ``values`` not among them is a
    :class:`ConfigError`."""
    check_ranges([(name, getattr(values, name), getattr(values, name) in allowed, f"one of {', '.join(allowed)}")
                  for name, allowed in choices])


def merge(base: RunConfig, updates: dict, source: str = "config") -> RunConfig:
    """A new config with ``updates`` applied; unknown keys and bad types are errors."""
    kinds = {f.name: {"int": int, "float": float, "str": str, "dict": dict}[f.type] for f in fields(RunConfig)}
    values = asdict(base)
    for key, value in updates.items():
        if value is None:
            continue
        if key not in kinds:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(kinds))})")
        values[key] = _coerce(key, value, kinds[key], source)
    return RunConfig(**values)


MAX_CONFIG_BYTES = 1 << 20


def load_toml(path: str) -> dict:
    try:
        if not Path(path).is_file():  # /dev/zero or a FIFO would never end
            raise ConfigError(f"cannot read config {path}: not a regular file")
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"cannot read config {path}: larger than {MAX_CONFIG_BYTES} bytes")
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_run_config(path: Path) -> dict:
    """A run's saved ``config.toml``; an empty one is refused: its defaults would stand in for the settings the
    run really had (a zero-byte file once made a resume list "changes" such as ``structure.init (None -> ...)``)."""
    settings = load_toml(str(path))
    if not settings:
        raise ConfigError(f"{path}: empty, so the run's settings are lost; restore the file (or start the run "
                          "again in another folder)")
    return settings


def parse_set(assignments: list) -> dict:
    """``["structure.levels_back.features=2", ...]`` -> nested dict; values in TOML syntax
    (a bare word that is not valid TOML is taken as a string)."""
    out: dict = {}
    for item in assignments or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. structure.max_depth=6")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        node[parts[-1]] = value
    return out


def deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for key, value in updates.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def resolve(config_file: Optional[str], overrides: dict, choices: Mapping[str, Choice]) -> RunConfig:
    """Defaults, then ``config_file``, then ``overrides``, validated against ``choices``; a bad value that came
    from the file is reported with the file's name."""
    cfg, settings = RunConfig(), {}
    if config_file:
        settings = load_toml(config_file)
        cfg = merge(cfg, settings, config_file)
    from_file = cfg
    cfg = merge(cfg, overrides, "command line")
    try:
        return cfg.validate(choices)
    except ConfigError as exc:  # name the file when the value that failed came from it
        if config_file and exc.key in settings and _fails_alike(from_file, exc, choices):
            raise ConfigError(f"{config_file}: {exc}") from None
        raise


def _fails_alike(cfg: RunConfig, error: ConfigError, choices: Mapping[str, Choice]) -> bool:
    """Whether ``cfg`` (the config file's values alone) fails validation as ``error`` says: then the value came
    from the file, even where the command line set other keys of the same table (``--set structure.x``)."""
    try:
        cfg.validate(choices)
    except ConfigError as exc:
        return str(exc) == str(error)
    return False
