"""The command line, and the only module that knows argparse.

``nero-deap search|final|report|evaluate`` (also ``python run.py ...`` and
``python -m nero_deap ...``).  Without a subcommand the options are
``search``'s, so the design card's ``python run.py --grammar
grammars/cnn.grammar`` still runs a search.  Each subcommand turns its
options into a settings object and calls a library function
(:func:`~nero_deap.commands.search.run_search`, :func:`~nero_deap.commands.final.run_final`,
:func:`~nero_deap.commands.report.run_report`); dependencies point from here to them,
never back.

Bad input (grammar, config, data, population) prints one line and exits 2;
a bad grammar prints ``file:line:col: message``.  A run in which a whole
generation failed exits 2 too; a full or read-only disk prints one line and
exits 1; a GPU that fails for another reason than memory stops the search
with one line and exit 3.  No tracebacks for users.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import __version__
from .search.objectives import DEFAULT_OBJECTIVES, OBJECTIVES
from .search.options import option_checks
from .search.parallel import FatalDeviceError
from .space.grammar import GrammarError
from .store.config import (ACCELERATE, SAVE_WEIGHTS, ConfigError, RunConfig, deep_update, load_run_config, load_toml,
                           merge, parse_set, resolve)

EXIT_BAD_INPUT = 2
EXIT_DEVICE_FAILED = 3
EXIT_OS_ERROR = 1  # the machine, not the input: a full or read-only disk
INTERRUPTED = {"final": "interrupted: finished models are in final.csv, a training under way continues from its "
                        "last snapshot (one every two minutes); continue with the same options and --resume"}


def add_accelerate_option(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--accelerate auto|on|off``, shared by search, final and the engine benchmark."""
    p.add_argument("--accelerate", choices=list(ACCELERATE), default=default,
                   help="bf16 autocast + channels_last while training (default auto: on for CUDA only)")


# ------------------------------------------------------------------ search
def add_protocol_options(p: argparse.ArgumentParser) -> None:
    """What decides a candidate's score (data, budget, attack, objectives, device): search's and evaluate's."""
    p.add_argument("--data", help="cifar10 | cifar100 | svhn | mnist | fashion-mnist (each also NAME:ROOT) | "
                                  "a directory or .zip with train/<class>/* and test/<class>/* | synthetic[:N]")
    p.add_argument("--config", help="TOML run configuration; command-line options override it")
    p.add_argument("--epochs", type=float, help="training epochs per candidate (default 5)")
    p.add_argument("--max-seconds", type=float, help="wall-clock cap per candidate's training")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--eps", type=float, help="FGSM L-inf strength on [0,1] pixels (default 8/255)")
    p.add_argument("--val-size", type=int,
                   help="validation images carved from train (default 5000; a fifth of smaller training sets)")
    p.add_argument("--train-subset", type=int, help="train on a stratified subset of this many images")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker")
    add_accelerate_option(p)
    p.add_argument("--objectives", help=f"comma list, two or more of {', '.join(OBJECTIVES)}, pgd<K> (e.g. pgd5) "
                                        f"(default {DEFAULT_OBJECTIVES}: NERO-Net's)")


def add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, TOML value syntax, e.g. --set structure.levels_back.features=3 "
                        "--set variation.add_connection=0.1 (repeatable)")


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The search space, the protocol's options, then the search's own (population, output, audit, fidelity)."""
    p.add_argument("--grammar", help="DSGE grammar file; a bare name such as cnn.grammar or "
                                     "grammars/cnn.grammar is found among the packaged grammars "
                                     "(default grammars/cnn.grammar)")
    add_protocol_options(p)
    p.add_argument("--population", type=int, help="population size, a multiple of 4 (default 20)")
    p.add_argument("--generations", type=int,
                   help="generations after the initial random one, DEAP's convention: 1 runs generation 0 and "
                        "one more (default 10)")
    p.add_argument("--out", help="output directory (default runs/<grammar>-seed<seed>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR; --generations can extend it")
    p.add_argument("--min-clean", type=float, help="constraint tau: clean accuracy >= tau (default off)")
    p.add_argument("--cxpb", type=float, help="crossover probability (default 0.5)")
    p.add_argument("--mutpb", type=float, help="mutation probability (default 1.0)")
    p.add_argument("--workers-per-gpu", type=int, help="evaluation workers sharing one GPU (default 1)")
    p.add_argument("--save-weights", choices=SAVE_WEIGHTS,
                   help="keep trained weights in RUN/weights/ of the Pareto front (default), all or none")
    p.add_argument("--algorithm", help="nsga2 (default) or random (the random-search baseline)")
    p.add_argument("--audit", help="masking audit attack on Pareto entrants: pgd<K> on the margin loss "
                                   "(default pgd20) or none")
    p.add_argument("--masking", help="flag (default): record audit flags; penalise: replace a flagged "
                                     "individual's robustness objectives by its audit accuracy")
    p.add_argument("--audit-n", type=int, help="validation images the audit attacks (a fixed sample; default 1000, "
                                                 "0 = all)")
    p.add_argument("--mask-threshold", type=float,
                   help="flag when a robustness objective exceeds the audit accuracy by more (default 0.10)")
    p.add_argument("--fidelity", help="full (default): every candidate trains for the whole budget; halving: all "
                                      "train for --halving-budget, the best --halving-keep go on to the full budget")
    p.add_argument("--halving-budget", type=float, help="halving: share of the budget before the cut (default 1/3)")
    p.add_argument("--halving-keep", type=float, help="halving: share that trains on to the full budget (default 0.5)")
    add_set_option(p)


# argparse destinations that are not RunConfig keys
NOT_CONFIG = {"config", "resume", "set", "command", "handler", "architecture", "run", "id", "json"}


def _overrides(args: argparse.Namespace, base: dict) -> dict:
    """Explicit options, then ``--set`` values merged into ``base``'s tables."""
    options = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG and v is not None}
    extra = parse_set(args.set)
    tables = {k: deep_update(base.get(k, {}), v) for k, v in extra.items() if isinstance(v, dict)}
    return {**options, **{k: v for k, v in extra.items() if not isinstance(v, dict)}, **tables}


def run_config(args: argparse.Namespace, run_dir: Optional[str] = None, option: str = "--resume",
               extra: Optional[dict] = None) -> RunConfig:
    """The configuration the options describe: on top of ``run_dir``'s config.toml when given, then
    ``--config``, then the command line (and ``extra``)."""
    if run_dir is None:
        base = load_toml(args.config) if args.config else {}
        return resolve(args.config, {**_overrides(args, base), **(extra or {})}, option_checks())
    saved = Path(run_dir) / "config.toml"
    if not saved.exists():
        raise ConfigError(f"{option} {run_dir}: no config.toml there")
    base = merge(RunConfig(), load_run_config(saved), str(saved))
    if args.config:
        base = merge(base, load_toml(args.config), args.config)
    return merge(base, {**_overrides(args, asdict(base)), **(extra or {})}, "command line").validate(option_checks())


@contextmanager
def naming_run_config(run_dir: Optional[str], typed: frozenset = frozenset()) -> Iterator[None]:
    """A data error about a value that ``run_dir``'s config.toml holds (a ``val_size`` below the class count,
    accepted by older versions) names that file, unless this command set that key (``typed``: options,
    ``--config``, ``--set``): the user did not type the value."""
    try:
        yield
    except Exception as exc:
        from .engine.sources import DataError

        saved = Path(run_dir) / "config.toml" if run_dir else None
        if not isinstance(exc, DataError) or exc.key is None or exc.key in typed or saved is None:
            raise
        try:
            holds = saved.is_file() and load_toml(str(saved)).get(exc.key) == exc.value
        except ConfigError:  # unreadable now: the data error is still the one to show
            raise exc from None
        if not holds:
            raise
        raise DataError(f"{saved}: {exc}", exc.key, exc.value) from None


def typed_keys(args: argparse.Namespace) -> frozenset:
    """The configuration keys this command sets itself: options, ``--set`` and the ``--config`` file."""
    return frozenset(_overrides(args, {})) | frozenset(load_toml(args.config) if args.config else ())


def checkpointed_generation(run_dir: Path) -> Optional[int]:
    """The last generation ``run_dir``'s checkpoint holds, None without a readable one."""
    from .store.logbook import load_checkpoint_or_previous

    try:
        return load_checkpoint_or_previous(Path(run_dir) / "checkpoint.pkl", echo=lambda message: None)["gen"]
    except (ConfigError, OSError):
        return None


def checkpoint_note(run_dir: Path) -> str:
    """What a search stopped by a disk error keeps: its last checkpointed generation, or nothing yet."""
    gen = checkpointed_generation(run_dir)
    if gen is None:
        return f"; no generation of {run_dir} was checkpointed yet"
    return f"; generation {gen} is checkpointed, continue with --resume {run_dir}"


def interrupted_search(run_dir: Path) -> str:
    """What Ctrl-C during a search leaves, and the command that continues it (with the run's own path)."""
    gen = checkpointed_generation(run_dir)
    if gen is None:
        return (f"interrupted: before generation 0 finished, so {run_dir} holds no checkpoint to resume; "
                "run the same command again to start over")
    return f"interrupted: generation {gen} is checkpointed; continue with --resume {run_dir}"


def warn_threads_change(run_dir: Path, cfg: RunConfig) -> None:
    """Warn when a resume changes ``--threads`` where that changes the numbers: BatchNorm's C kernels (bf16 on
    the CPU) sum their statistics in one block per thread, so gradients and running variances differ in their
    last bits between thread counts, and the resumed run no longer repeats an uninterrupted one exactly."""
    saved = load_toml(str(run_dir / "config.toml"))
    before = saved.get("threads", 0)
    if before != cfg.threads and cfg.accelerate == "on" and cfg.device in ("auto", "cpu"):
        warnings.warn(f"--threads {cfg.threads or 'default'} differs from the run's {before or 'default'}: on a CPU "
                      "in bf16 the resumed generations will not repeat an uninterrupted run's numbers to the bit "
                      "(BatchNorm sums per thread); the search stays valid", stacklevel=2)


def search_command(args: argparse.Namespace) -> int:
    from .commands.search import run_search

    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError(f"--out {args.out}: a resumed run stays in its folder ({args.resume}); leave --out out")
    cfg = run_config(args, args.resume, extra={"out": args.resume}) if args.resume else run_config(args)
    if args.resume:
        warn_threads_change(Path(args.resume), cfg)
    try:
        if args.resume:
            with naming_run_config(args.resume, typed_keys(args)):
                run_search(cfg, resume=True)
        else:
            run_search(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_search(cfg.run_dir())) from None
    except OSError as exc:  # a full or read-only disk: say what the run keeps (main prints the error)
        exc.nero_deap_note = checkpoint_note(cfg.run_dir())
        raise
    return 0


# ------------------------------------------------------------------- final
def add_final_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a search run directory (runs/<name>)")
    p.add_argument("--select", default="pareto",
                   help="pareto (default), sum (of normalised objectives) or one of the run's objective names")
    p.add_argument("--top", type=int, default=0, help="keep this many (default: whole front, or 3 for rankings)")
    p.add_argument("--epochs", type=float, default=50, help="standard/adversarial training epochs (default 50)")
    p.add_argument("--adv", action="append", choices=["fgsm-rs", "pgd"], default=[],
                   help="also train adversarially (repeatable)")
    p.add_argument("--adv-epochs", type=float, help="epochs of adversarial training (default --epochs)")
    p.add_argument("--aa-n", type=int, help="AutoAttack on the first N test images (default: all on a GPU, "
                                            "the first 100 on a CPU; 0 skips it)")
    p.add_argument("--aa-iterations", type=int,
                   help="a reduced AutoAttack for quick checks and tests: its four attacks with N iterations each "
                        "(final.csv's aa_version says so); its numbers are not standard AutoAttack's")
    p.add_argument("--aa-budget", type=float, default=30.0,
                   help="refuse, before it starts, an AutoAttack expected (from a timed batch) to take longer than "
                        "this many minutes per model (default 30; inf: no limit)")
    p.add_argument("--pgd50", action="store_true", help="also PGD-50 with restarts")
    p.add_argument("--pgd50-restarts", type=int, default=5, help="random restarts of PGD-50 (default 5)")
    p.add_argument("--mask-gap", type=float, default=0.10, help="flag when FGSM − PGD exceeds this (default 0.10)")
    p.add_argument("--sweep-n", type=int, default=500, help="test images for the epsilon sweep (default 500)")
    p.add_argument("--train-subset", type=int, help="train stages 2-3 on a stratified subset (CPU-scale runs)")
    p.add_argument("--test-n", type=int, help="evaluate on a stratified test subset (CPU-scale runs)")
    p.add_argument("--skip-search-stage", action="store_true", help="do not re-create stage (1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: a GPU if any)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an interrupted 'final' with the same options finished (final.csv)")
    add_accelerate_option(p, default="auto")


def final_command(a: argparse.Namespace) -> int:
    from .commands.final import FinalSettings, run_final

    settings = FinalSettings(
        select=a.select, top=a.top, epochs=a.epochs, adv=a.adv, adv_epochs=a.adv_epochs, aa_n=a.aa_n,
        aa_budget=a.aa_budget, aa_iterations=a.aa_iterations, pgd50=a.pgd50, pgd50_restarts=a.pgd50_restarts, sweep_n=a.sweep_n, mask_gap=a.mask_gap,
        train_subset=a.train_subset, test_n=a.test_n, skip_search_stage=a.skip_search_stage, device=a.device,
        threads=a.threads, accelerate=ACCELERATE[a.accelerate], resume=a.resume)
    with naming_run_config(a.run, frozenset({"train_subset"} if a.train_subset else ())):
        run_final(Path(a.run), settings)
    return 0


# ------------------------------------------------------------------ report
def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="search run directories")
    p.add_argument("--out", help="output directory (default RUN/report, or runs/report for several runs)")


def report_command(a: argparse.Namespace) -> int:
    from .commands.report import ReportSettings, run_report

    run_report(ReportSettings(runs=[Path(r) for r in a.runs], out=Path(a.out) if a.out else None))
    return 0


# ---------------------------------------------------------------- evaluate
def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("architecture", help="a phenotype (its one-line text) or a file holding one, e.g. "
                                        "grammars/reference/vgg-small.txt")
    p.add_argument("--run", metavar="DIR", help="score with this search run's protocol (its config.toml); "
                                                 "the options below, where given, override it")
    p.add_argument("--id", type=int, default=0,
                   help="seed as the run's individual with this id (default 0); with --run and an id of that run, "
                        "reproduces its score")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_protocol_options(p)  # the search's own options (--out, --population, --resume ...) do not apply: refused
    add_set_option(p)


def evaluate_command(a: argparse.Namespace) -> int:
    from .commands.evaluate import evaluate_architecture, read_phenotype, result_json, result_line

    if a.id < 0:
        raise ConfigError(f"--id must be a candidate id (>= 0), got {a.id}")
    cfg = run_config(a, a.run, "--run")
    try:
        phenotype = read_phenotype(a.architecture)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"architecture {a.architecture[:80]!r}: {exc}") from None
    with naming_run_config(a.run, typed_keys(a)):
        result = evaluate_architecture(phenotype, cfg, a.id)
    print(result_json(result) if a.json else result_line(result, cfg))
    return 0 if result["status"] == "ok" else EXIT_BAD_INPUT


# ---------------------------------------------------------------- commands
# name -> (one-line help, options, handler): a new command gets its entry here and nowhere else.
COMMANDS: dict = {
    "search": ("evolve CNNs for clean and FGSM accuracy (NSGA-II over a DSGE grammar); the default command",
               add_search_options, search_command),
    "final": ("retrain a run's winners, attack them with FGSM, PGD and AutoAttack on the test split, "
              "audit gradient masking", add_final_options, final_command),
    "report": ("plots and a summary table of one or several search runs", add_report_options, report_command),
    "evaluate": ("score one architecture (a phenotype) with exactly a run's fitness protocol: reference points",
                 add_evaluate_options, evaluate_command),
}


def build_parser(prog: str = "nero-deap") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="nero-deap: evolve CNNs that are adversarially robust by design (NERO-Net on DEAP).",
        epilog=f"Without a subcommand the options are search's: '{prog} --grammar grammars/cnn.grammar' "
               f"is '{prog} search --grammar grammars/cnn.grammar'. '{prog} COMMAND --help' describes each command.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (summary, add_options, handler) in COMMANDS.items():
        sp = sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".")
        add_options(sp)
        sp.set_defaults(handler=handler)
    return p


def parse_command_line(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is reported with its command's usage and the closest
    option that command has (``--populaton``: did you mean --population?), not the top-level usage."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        sub = commands[args.command]
        known = [option for action in sub._actions for option in action.option_strings]
        close = difflib.get_close_matches(extra[0].split("=")[0], known, n=1)
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def _with_command(argv: list) -> list:
    """Prepend ``search`` unless argv names a command or asks for top-level help/version."""
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["search"] + argv


def main(argv: Optional[list] = None, prog: str = "nero-deap") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        args = parse_command_line(build_parser(prog), _with_command(argv))
        handler: Callable = args.handler
        return handler(args)
    except GrammarError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FatalDeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DEVICE_FAILED
    except KeyboardInterrupt as exc:
        print(str(exc) or INTERRUPTED.get(_with_command(argv)[0], "interrupted"), file=sys.stderr)
        return 130
    except Exception as exc:  # data errors are user input too
        from .commands.search import SearchFailed
        from .engine.sources import DataError
        from .nets.export import ModelFileError

        if isinstance(exc, (DataError, ModelFileError, SearchFailed)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, OSError):  # a full or read-only disk: checkpoints are atomic, the last one is intact
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"error: {exc.strerror or exc}{where}{getattr(exc, 'nero_deap_note', '')}", file=sys.stderr)
            return EXIT_OS_ERROR
        raise


def console_main(prog: str = "nero-deap") -> None:
    """Entry point of the ``nero-deap`` command, ``run.py`` and ``python -m nero_deap``: exit with main's code."""
    from .search.parallel import running_under_scoop

    code = main(prog=prog)
    if code and running_under_scoop():
        # SCOOP runs the entry point as a future and prints a traceback for SystemExit:
        # leave with the exit code directly so users see one clean error line.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
