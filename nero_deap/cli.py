"""Command line: ``run.py [search options]``, ``run.py final RUN``, ``run.py report RUN...``.

Bad input (grammar, config, data, population) prints one line and exits 2;
a bad grammar prints ``file:line:col: message``.  A run in which a whole
generation failed exits 2 too; a full or read-only disk prints one line and
exits 1.  No tracebacks for users.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .config import (ACCELERATE, SAVE_WEIGHTS, ConfigError, RunConfig, deep_update, load_toml, merge, parse_set,
                     resolve)
from .grammar import GrammarError

EXIT_BAD_INPUT = 2
EXIT_OS_ERROR = 1  # the machine, not the input: a full or read-only disk


def add_accelerate_option(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--accelerate auto|on|off``, shared by search, final and the engine benchmark."""
    p.add_argument("--accelerate", choices=list(ACCELERATE), default=default,
                   help="bf16 autocast + channels_last while training (default auto: on for CUDA only)")


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", description="Evolve CNNs for clean and FGSM accuracy (NSGA-II over a DSGE grammar).",
        epilog="Subcommands: 'run.py final RUN_DIR' (retrain + strong attacks), 'run.py report RUN_DIR...'.")
    p.add_argument("--grammar", help="DSGE grammar file (default grammars/cnn.grammar)")
    p.add_argument("--data", help="cifar10 | cifar10:ROOT | a directory or .zip with train/<class>/* and "
                                  "test/<class>/* | synthetic[:N]")
    p.add_argument("--config", help="TOML run configuration; command-line options override it")
    p.add_argument("--population", type=int, help="population size, a multiple of 4 (default 20)")
    p.add_argument("--generations", type=int, help="number of generations (default 10)")
    p.add_argument("--epochs", type=float, help="training epochs per candidate (default 5)")
    p.add_argument("--max-seconds", type=float, help="wall-clock cap per candidate's training")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--out", help="output directory (default runs/<grammar>-seed<seed>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR; --generations can extend it")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--eps", type=float, help="FGSM L-inf strength on [0,1] pixels (default 8/255)")
    p.add_argument("--min-clean", type=float, help="constraint tau: clean accuracy >= tau (default off)")
    p.add_argument("--cxpb", type=float, help="crossover probability (default 0.5)")
    p.add_argument("--mutpb", type=float, help="mutation probability (default 1.0)")
    p.add_argument("--val-size", type=int, help="validation images carved from train (default 5000)")
    p.add_argument("--train-subset", type=int, help="train on a stratified subset of this many images")
    p.add_argument("--workers-per-gpu", type=int, help="evaluation workers sharing one GPU (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker")
    add_accelerate_option(p)
    p.add_argument("--save-weights", choices=SAVE_WEIGHTS,
                   help="keep trained weights in RUN/weights/ of the Pareto front (default), all or none")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, TOML value syntax, e.g. --set structure.levels_back.features=3 "
                        "--set variation.add_connection=0.1 (repeatable)")
    return p


def _overrides(args: argparse.Namespace, base: dict) -> dict:
    """Explicit options, then ``--set`` values merged into ``base``'s tables."""
    skip = {"config", "resume", "set"}
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    extra = parse_set(args.set)
    tables = {k: deep_update(base.get(k, {}), v) for k, v in extra.items() if isinstance(v, dict)}
    return {**options, **{k: v for k, v in extra.items() if not isinstance(v, dict)}, **tables}


def run_search_cli(argv: list) -> int:
    args = search_parser().parse_args(argv)
    from .search import run_search

    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.exists():
            raise ConfigError(f"--resume {args.resume}: no config.toml there")
        base = merge(RunConfig(), load_toml(str(saved)), str(saved))
        if args.config:
            base = merge(base, load_toml(args.config), args.config)
        overrides = _overrides(args, asdict(base))
        cfg = merge(base, {**overrides, "out": args.resume}, "command line").validate()
        run_search(cfg, resume=True)
    else:
        base = load_toml(args.config) if args.config else {}
        run_search(resolve(args.config, _overrides(args, base)))
    return 0


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        if argv and argv[0] == "final":
            from .final import final_cli

            return final_cli(argv[1:])
        if argv and argv[0] == "report":
            from .report import report_cli

            return report_cli(argv[1:])
        return run_search_cli(argv)
    except GrammarError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the last finished generation is checkpointed; continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # data errors are user input too
        from .data import DataError
        from .export import ModelFileError
        from .search import SearchFailed

        if isinstance(exc, (DataError, ModelFileError, SearchFailed)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, OSError):  # a full or read-only disk: checkpoints are atomic, the last one is intact
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"error: {exc.strerror or exc}{where}; the last finished generation is checkpointed",
                  file=sys.stderr)
            return EXIT_OS_ERROR
        raise
