"""The search command: config in, ``runs/<name>/`` out, resumable after any kill.

A run that cannot work must not report success: what can be checked at
start-up is (the device exists, the split fits the data, the grammar's layer
types and activations are known to the decoder, ``--out`` is a directory),
and a generation in which every candidate failed stops the run with
:class:`SearchFailed` (exit 2) after its checkpoint is written, naming the
most frequent reasons (see :func:`check_generation`).

A :class:`~nero_deap.search.parallel.FatalDeviceError` from a worker (its CUDA
context is broken) stops the search: nothing of the unfinished generation
is recorded, the last checkpoint stays, and the error says how to continue.
"""
from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial, wraps
from pathlib import Path
from typing import Callable

from deap import tools

from ..common.files import write_bytes_atomic
from ..common.resources import grammar_file
from ..engine.data import training_size
from ..engine.sources import cache_dir
from ..search.audit import AuditSettings, make_auditor
from ..search.evolution import (ALGORITHMS, Constraint, SearchState, initial_generation, is_complete, make_toolbox,
                                take_weights, use_objectives)
from ..search.fidelity import register as register_fidelity
from ..search.fitness import EvalContext, derive_seed, died_in_flight, evaluate_remote, resume_remote, worker_raw
from ..search.objectives import CONSTRAINED, hypervolume, parse as parse_objectives
from ..search.options import option_checks
from ..search.parallel import FatalDeviceError, get_map, resent_count
from ..space.dialect import VALUE_CHOICES, meaning
from ..space.grammar import Grammar, GrammarError, NonTerminal, Range, Terminal
from ..space.operators import VariationRates
from ..space.structure import NetworkStructure
from ..store.config import ACCELERATE, ConfigError, RunConfig, check_resume, load_toml, merge
from ..store.logbook import (append_csv, gen_columns, individual_columns, load_checkpoint_or_previous,
                             previous_checkpoint, prune_weights, remove_temp_files, restore_gens, restore_individuals,
                             save_checkpoint, store_weights, temp_file_target, write_csv)
from ..store.runlock import LOCK_NAME, run_lock


class SearchFailed(RuntimeError):
    """Every candidate of a generation failed: the run cannot be working (its checkpoint is kept)."""


def load_search_space(cfg: RunConfig, echo: Callable = print) -> tuple:
    """Grammar, structure and variation rates, validated (GrammarError / ConfigError)."""
    grammar = Grammar.from_file(grammar_file(cfg.grammar))
    try:
        structure = NetworkStructure.from_config(cfg.structure)
        rates = VariationRates.from_config(cfg.variation)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    for note in structure.adapt_defaults(grammar, cfg.structure):
        echo(f"note: {note}")
    structure.validate(grammar)
    check_decodable(grammar, [m.name for m in structure.modules] + [structure.output] + list(structure.macro))
    return grammar, structure, rates


def check_decodable(grammar: Grammar, starts: list) -> None:
    """Refuse (file:line:col) a reachable terminal the decoder rejects (``layer:``, ``act:``, ``learning:``, a
    value outside a key's choices, a numeric gene for such a key) and an alternative that can set one key
    twice (directly, through a nested rule, or by two names of one thing): the phenotype would keep one value
    silently, or every candidate using it would fail, one training at a time."""
    from ..nets.network import term_problem

    reachable = grammar.reachable(starts)
    keys = _settable_keys(grammar, reachable)
    for nt in grammar.rules:
        if nt not in reachable:
            continue
        for alt in grammar.rules[nt]:
            seen: dict = {}
            for symbol in alt:
                problem = _symbol_problem(symbol, term_problem)
                for key in sorted(_symbol_keys(symbol, keys)):
                    if not problem and key in seen:
                        problem = (f"<{nt}> can set {key!r} twice ({seen[key]} and {_describe(symbol)}): "
                                   "a phenotype keeps one value")
                    seen.setdefault(key, _describe(symbol))
                if problem:
                    line, col = (grammar.terminal_position(symbol.text) if isinstance(symbol, Terminal)
                                 else grammar.positions[nt])
                    raise GrammarError(problem, grammar.source, line, col)


def _symbol_problem(symbol, term_problem: Callable) -> str:
    if isinstance(symbol, Terminal) and ":" in symbol.text:
        return term_problem(*symbol.text.split(":", 1))
    if isinstance(symbol, Range) and meaning(symbol.name) in VALUE_CHOICES:
        return f"[{symbol.name},...]: a numeric gene cannot give {symbol.name}, which takes " \
               f"{' or '.join(map(str, VALUE_CHOICES[meaning(symbol.name)]))}"
    return ""


def _symbol_keys(symbol, keys: dict) -> set:
    """The canonical keys ``symbol`` can set (a rule: any of its derivations')."""
    if isinstance(symbol, NonTerminal):
        return keys.get(symbol.name, set())
    return {meaning(symbol.name if isinstance(symbol, Range) else symbol.text.split(":", 1)[0])}


def _settable_keys(grammar: Grammar, rules: set) -> dict:
    """Rule -> the canonical keys its derivations can set, in one linear pass (:meth:`Grammar.derivable`):
    a fixpoint loop here once took 73 s on a 4,000-rule chain and never finished on 20,000."""
    return grammar.derivable(rules, lambda symbol: _symbol_keys(symbol, {}))


def _describe(symbol) -> str:
    if isinstance(symbol, NonTerminal):
        return f"<{symbol.name}>"
    return f"[{symbol.name},...]" if isinstance(symbol, Range) else symbol.text


def check_device(device: str) -> None:
    """A ``cuda``/``cuda:N`` request must name a GPU this machine has (checked on the launching host)."""
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        have = f"only {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})" if count else "no CUDA GPU"
        raise ConfigError(f"device {device!r}: this machine has {have}; use --device auto or cpu")


def preflight(cfg: RunConfig, ctx: EvalContext) -> None:
    """Start-up checks of what would otherwise fail every candidate, or fail late."""
    run_dir = cfg.run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")
    check_protocol(ctx)


def check_protocol(ctx: EvalContext) -> None:
    """The device, the data and its split can serve the fitness protocol (one line, exit 2, if not): shared by
    the search and by ``evaluate``, which once reported a missing dataset as a zero score."""
    check_device(ctx.device)
    raw = worker_raw(ctx.data, ctx.cache_dir)  # fail early (exit 2) on missing data; a serial map reuses it
    training_size(raw.train_y, ctx.val_size, ctx.train_subset)


def check_generation(gen: int, evaluated: list, run_dir: Path) -> None:
    """Raise :class:`SearchFailed` when every candidate evaluated in ``gen`` failed.

    In generation 0 any failure counts: a whole random population failing
    means the setup cannot work.  Later generations evaluate only a few new
    offspring, and ``diverged``, ``oom`` or ``invalid`` are properties of one
    candidate that selection deals with; there, only a generation in which
    every candidate failed with an unexpected ``error`` (a broken device,
    missing data, a bug) stops the run.
    """
    statuses = {ind.meta.get("status") for ind in evaluated}
    if not evaluated or "ok" in statuses or (gen > 0 and statuses != {"error"}):
        return
    texts = [" ".join(f"{ind.meta.get('status')}: {ind.meta.get('reason', '')}".split())[:160] for ind in evaluated]
    kinds = Counter(re.sub(r"\d+", "#", text) for text in texts)  # same reason, other numbers: one kind
    example = {re.sub(r"\d+", "#", text): text for text in reversed(texts)}  # first text of each kind
    common = "; ".join(f"{n}x {example[kind]}" for kind, n in kinds.most_common(3))
    raise SearchFailed(f"every candidate of generation {gen} failed ({len(evaluated)}); most frequent: {common}. "
                       f"The run is checkpointed: fix the cause, then --resume {run_dir}")


def _absolute_data(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def eval_context(cfg: RunConfig, structure: NetworkStructure) -> EvalContext:
    return EvalContext(
        grammar_path=str(grammar_file(cfg.grammar).resolve()), structure_json=json.dumps(structure.to_config()),
        data=_absolute_data(cfg.data), val_size=cfg.val_size or None, train_subset=cfg.train_subset or None,
        split_seed=cfg.split_seed, epochs=cfg.epochs, max_seconds=cfg.max_seconds or None, eps=cfg.eps,
        device=cfg.device, workers_per_gpu=cfg.workers_per_gpu, threads=cfg.threads or None, run_seed=cfg.seed,
        accelerate=ACCELERATE[cfg.accelerate], return_weights=cfg.save_weights != "none" or cfg.audit != "none",
        objectives=cfg.objectives, audit=cfg.audit, audit_n=cfg.audit_n,
        pause_at=cfg.halving_budget if cfg.fidelity == "halving" else None,
        inflight_dir=str((cfg.run_dir() / "inflight").resolve()),  # report_deaths reads it
        cache_dir=str(cache_dir().expanduser().absolute()))


def report_deaths(run_dir: Path, echo: Callable, run_is_live: bool = False) -> None:
    """Say which candidates a process was evaluating when it died (no Python handler ran; see
    fitness.in_flight).  At start-up a note only says the run stopped during that evaluation: a kill, a crash,
    or a disk turned read-only that kept the process from removing its note; while the run goes on, the
    process is known to be gone."""
    for note in died_in_flight(str(run_dir / "inflight"), run_is_live):
        what = "died while evaluating" if run_is_live else "was evaluating"
        when = "" if run_is_live else " when the run stopped (a kill, a crash, or a disk error)"
        echo(f"warning: process {note['pid']} on {note['host']} {what} candidate {note['id']} "
             f"of generation {note['gen']}{when}: {note['phenotype']}")


def individual_row(ind, toolbox, objectives) -> dict:
    meta = getattr(ind, "meta", {})
    row = {"gen": getattr(ind, "gen", 0), "id": ind.id, "parents": ";".join(map(str, ind.parents)),
           "params": meta.get("params", 0), "flops": meta.get("flops", 0),
           "train_s": round(meta.get("train_s", 0.0), 3), "status": meta.get("status", ""),
           "reason": meta.get("reason", ""), "audit_acc": meta.get("audit_acc", ""),
           "zero_grad": meta.get("zero_grad", ""),
           "masking": meta.get("masking", ""), "fidelity": meta.get("fidelity", 1.0),
           "audit_s": round(meta["audit_s"], 3) if "audit_s" in meta else "",
           "phenotype": toolbox.phenotype_text(ind)}
    row.update({o.column: v for o, v in zip(objectives, ind.fitness.values)})
    return row


def generation_row(gen: int, population: list, evaluated: list, archive, wall_s: float, objectives,
                   resent: int = 0) -> dict:
    """One gens.csv row; ``resent``: evaluations SCOOP re-sent to another worker (each may run twice)."""
    row = {"gen": gen, "nevals": len(evaluated)}
    trained = [ind for ind in population if is_complete(ind)] or population  # stopped scores are not a best
    for i, o in enumerate(objectives):
        values = [ind.fitness.values[i] for ind in trained]
        row.update({f"{o.name}_avg": statistics.fmean(values), f"{o.name}_std": statistics.pstdev(values),
                    f"{o.name}_min": min(values), f"{o.name}_max": max(values)})
    row["hypervolume"] = hypervolume([ind.fitness.values for ind in archive], objectives)
    row["front_size"] = len(archive)
    row["failed"] = sum(1 for ind in evaluated if ind.meta.get("status") != "ok")
    row["stopped"] = sum(1 for ind in evaluated if not is_complete(ind))
    row["flagged"] = sum(1 for ind in archive if getattr(ind, "meta", {}).get("masking") is True)
    row["wall_s"] = round(wall_s, 3)
    row["resent"] = resent
    row["train_s"] = round(sum(ind.meta.get("train_s", 0.0) for ind in evaluated), 3)
    row["audit_s"] = round(sum(ind.meta.get("audit_s", 0.0) for ind in evaluated), 3)
    row["evals_per_h"] = round(len(evaluated) * 3600 / wall_s, 1) if wall_s > 0 else ""
    return row


def summary_line(row: dict, generations: int, objectives) -> str:
    best = "  ".join(f"{o.name} avg {row[f'{o.name}_avg']:.3g} {'max' if o.maximise else 'min'} "
                     f"{row[f'{o.name}_max' if o.maximise else f'{o.name}_min']:.3g}" for o in objectives)
    return (f"gen {row['gen']:>3}/{generations}  evals {row['nevals']:>3}  {best}  HV {row['hypervolume']:.4f}  "
            f"front {row['front_size']}  flagged for masking {row['flagged']} (see audit_acc)  "
            f"failed {row['failed']}  {row['wall_s']:.1f}s"
            + (f"  stopped {row['stopped']}" if row.get("stopped") else "")
            + (f"  {row['evals_per_h']:.0f} evals/h" if row.get("evals_per_h") not in (None, "") else "")
            + (f"  resent {row['resent']}" if row.get("resent") else "")
            + cost_estimate(row, generations))


ESTIMATE_ABOVE_S = 3600.0  # a search expected to take longer says so after generation 0


def cost_estimate(row: dict, generations: int) -> str:
    """After generation 0 of a long search: roughly how long the remaining generations take.

    Each later generation evaluates at most as many new candidates as generation 0 did (its duplicates are
    dropped), so generation 0's wall clock times the remaining generations bounds the rest; printed only
    when that exceeds an hour, so a user who started the multi-hour default knows what they started."""
    if row["gen"] != 0 or not generations:
        return ""
    remaining = float(row["wall_s"]) * generations
    return f"  estimate: up to {remaining / 3600:.1f} h for {generations} more" if remaining > ESTIMATE_ABOVE_S else ""


def phenotype_summary(text: str) -> str:
    """``conv x4, pool-max x2, fc x2; gradient-descent``: the layer types of a phenotype, in order of first use."""
    layers, _, learning = text.partition("||")
    kinds = [word.split(":", 1)[1] for part in layers.split("|") for word in part.split() if word.startswith("layer:")]
    counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    optimiser = next((w.split(":", 1)[1] for w in learning.split() if w.startswith("learning:")), "")
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) + (f"; {optimiser}" if optimiser else "")


def front_table(archive, objectives, toolbox) -> str:
    """The Pareto front as a small text table: id, each objective, parameters, what the network is made of."""
    import pandas as pd

    rows = [{"id": ind.id, **{o.name: round(v, 4) for o, v in zip(objectives, ind.fitness.values)},
             "params": ind.meta.get("params", ""), "masking": ind.meta.get("masking", ""),
             "network": phenotype_summary(toolbox.phenotype_text(ind))} for ind in archive]
    if not rows:
        return "(empty front: every candidate failed; see individuals.csv's reason column)"
    frame = pd.DataFrame(rows).sort_values(objectives[0].name, ascending=not objectives[0].maximise)
    return frame.to_string(index=False, max_colwidth=70)


def progress_bar(gen: int) -> Callable:
    def wrap(results, total):
        if not sys.stderr.isatty():
            return results
        from tqdm import tqdm

        return tqdm(results, total=total, desc=f"gen {gen}", unit="net", leave=False)
    return wrap


def _rng_states() -> dict:
    """Python, numpy and torch RNG states as plain values (tuples, lists, bytes), so the
    checkpoint needs no numpy or torch class to load."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state().numpy().tobytes()}


def _restore_rng(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch_state = states["torch"]  # bytes; a uint8 tensor in checkpoints of earlier versions
    if not isinstance(torch_state, torch.Tensor):
        torch_state = torch.frombuffer(bytearray(torch_state), dtype=torch.uint8)
    torch.set_rng_state(torch_state)


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _names_run_dir(write: Callable) -> Callable:
    """OSErrors without a file name (ENOSPC comes from ``write()``) name the run directory instead."""
    @wraps(write)
    def wrapper(run_dir: Path, *args, **kwargs):
        try:
            return write(run_dir, *args, **kwargs)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(run_dir)
            raise
    return wrapper


@_names_run_dir
def record(run_dir: Path, state: SearchState, evaluated: list, toolbox, wall_s: float, cfg: RunConfig,
           echo: Callable) -> None:
    """Write this generation's weights and CSV rows, then the checkpoint (the commit point)."""
    keep = {"front": {ind.id for ind in state.archive}, "all": None, "none": set()}[cfg.save_weights]
    store_weights(run_dir, state.weights, keep)  # with --save-weights none the audit still needed the bytes
    state.weights.clear()
    objectives = parse_objectives(cfg.objectives)
    columns = individual_columns(objectives)
    append_csv(run_dir / "individuals.csv", columns, [individual_row(i, toolbox, objectives) for i in evaluated])
    row = generation_row(state.gen, state.population, evaluated, state.archive, wall_s, objectives, resent_count())
    append_csv(run_dir / "gens.csv", gen_columns(objectives), [row])
    write_csv(run_dir / "pareto.csv", columns, [individual_row(i, toolbox, objectives) for i in state.archive])
    save_checkpoint(run_dir / "checkpoint.pkl", {
        "population": state.population, "archive": state.archive, "logbook": state.gen_rows + [row],
        "gen": state.gen, "next_id": state.next_id, "rng": _rng_states()})
    state.gen_rows.append(row)
    if keep is not None:
        prune_weights(run_dir, keep)
    echo(summary_line(row, cfg.generations, objectives))
    report_deaths(run_dir, echo, run_is_live=True)
    check_generation(state.gen, evaluated, run_dir)


@contextmanager
def stop_on_fatal_device_error(run_dir: Path, checkpointed: bool):
    """Re-raise a worker's :class:`FatalDeviceError` saying what was kept and how to go on."""
    try:
        yield
    except FatalDeviceError as exc:
        after = (f"the last finished generation is checkpointed: check the GPU, then continue with --resume {run_dir}"
                 if checkpointed else "no generation had finished: check the GPU, then start the run again")
        raise FatalDeviceError(f"{exc}; that process's GPU is unusable, so the search stopped; {after}") from None


def _resume_state(run_dir: Path, toolbox, objectives, echo: Callable) -> SearchState:
    """The state of the last good checkpoint, with the outputs cut back to match it."""
    leftovers = remove_temp_files(run_dir)
    if leftovers:
        echo(f"removed {len(leftovers)} temporary file(s) left by a kill during a write")
    saved = load_checkpoint_or_previous(run_dir / "checkpoint.pkl", echo)
    state = SearchState(saved["population"], saved["archive"], saved["gen"], saved["next_id"], saved["logbook"])
    take_weights(list(state.archive) + state.population, None)  # checkpoints of earlier versions carried some
    _restore_rng(saved["rng"])
    columns = individual_columns(objectives)
    # the checkpoint is the source of truth: rows past it go, damaged, cut or missing tables are rebuilt from it
    known = [individual_row(i, toolbox, objectives) for i in list(state.population) + list(state.archive)]
    for line in restore_individuals(run_dir / "individuals.csv", columns, known, state.gen_rows, state.gen):
        echo(line)
    for line in restore_gens(run_dir / "gens.csv", gen_columns(objectives), state.gen_rows, state.gen):
        echo(line)
    write_csv(run_dir / "pareto.csv", columns, [individual_row(i, toolbox, objectives) for i in state.archive])
    return state


def _fresh_state(run_dir: Path, toolbox, cfg: RunConfig, constraint: Constraint, echo: Callable) -> SearchState:
    """Generation 0, evaluated and recorded; leftovers of a run killed before its first checkpoint go first."""
    _seed_all(cfg.seed)
    for path in [run_dir / name for name in ("individuals.csv", "gens.csv", "pareto.csv")] + [
            previous_checkpoint(run_dir / "checkpoint.pkl")]:
        path.unlink(missing_ok=True)
    remove_temp_files(run_dir)
    prune_weights(run_dir, keep=set())
    state = SearchState([], tools.ParetoFront())
    start = time.perf_counter()
    with stop_on_fatal_device_error(run_dir, checkpointed=False):
        evaluated = initial_generation(state, toolbox, cfg.population, constraint, progress_bar(0))
    record(run_dir, state, evaluated, toolbox, time.perf_counter() - start, cfg, echo)
    return state


def _unfinished_run_here(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the config.toml a search writes before its first generation, for this folder
    (or only the temporary file of one, from a search killed while writing it)."""
    if all(temp_file_target(p) == "config.toml" or p.name == LOCK_NAME for p in run_dir.iterdir()):
        return True
    try:
        saved = merge(RunConfig(), load_toml(str(run_dir / "config.toml")))
    except ConfigError:  # missing, unreadable, or not ours
        return False
    return saved.run_dir().resolve() == run_dir.resolve()


def _holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpointed run (its newest or previous checkpoint)."""
    checkpoint = run_dir / "checkpoint.pkl"
    return checkpoint.exists() or previous_checkpoint(checkpoint).exists()


def _refuse_existing_run(run_dir: Path) -> None:
    """A fresh search never overwrites a run: checked before the data loads and again under the run's lock."""
    raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")


def run_search(cfg: RunConfig, resume: bool = False, echo: Callable = print) -> Path:
    """Run (or, with ``resume``, continue) the search ``cfg`` describes; returns the run directory.

    On resume, ``cfg`` must match the saved config.toml except for
    :data:`~nero_deap.store.config.RESUME_MAY_CHANGE`, and config.toml is rewritten
    only once the checkpoint has loaded, so a refused resume changes nothing.
    """
    cfg.validate(option_checks())  # a library caller's RunConfig is checked as the command line's is
    run_dir = cfg.run_dir()
    if resume:
        if not _holds_run(run_dir):
            raise ConfigError(f"--resume {run_dir}: no checkpoint.pkl there")
        check_resume(run_dir, cfg, tables=False)  # a changed grammar or seed, before the grammar is read
    elif _holds_run(run_dir):
        _refuse_existing_run(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not _unfinished_run_here(run_dir):
        # a run killed before its first checkpoint is started again, its leftovers removed; a folder that is
        # not a run at all (a user's files, a config.toml of their own) is not ours to clean
        raise ConfigError(f"--out {run_dir}: not empty and not a nero-deap run started there (no config.toml "
                          "naming it); pick another --out or an empty folder")
    grammar, structure, rates = load_search_space(cfg, echo)
    resolved = replace(cfg, structure=structure.to_config(), variation=asdict(rates))
    if resume:
        check_resume(run_dir, resolved)
    ctx = eval_context(cfg, structure)
    preflight(cfg, ctx)
    objectives = parse_objectives(cfg.objectives)
    use_objectives(objectives)
    toolbox = make_toolbox(grammar, structure, rates, partial(evaluate_remote, ctx=ctx), get_map())
    toolbox.register("resume_evaluation", partial(resume_remote, ctx=ctx))
    register_fidelity(toolbox, cfg.fidelity, cfg.halving_keep)
    audit = AuditSettings(cfg.audit, cfg.mask_threshold, cfg.masking)
    if audit.enabled:
        toolbox.register("audit", make_auditor(toolbox.map, ctx, objectives, audit, partial(derive_seed, cfg.seed)))
    constraint = Constraint(next((i for i, o in enumerate(objectives) if o.name == CONSTRAINED), None),
                            cfg.min_clean)
    generation = ALGORITHMS[cfg.algorithm]
    with run_lock(run_dir, "search", option="--out"):  # before the first write: resume truncates tables
        if not resume and _holds_run(run_dir):
            _refuse_existing_run(run_dir)  # another search checkpointed here while this one loaded its data
        state = _resume_state(run_dir, toolbox, objectives, echo) if resume else None
        if state is not None and cfg.generations <= state.gen:  # config.toml keeps what the run really has
            if cfg.generations < state.gen:
                raise ConfigError(f"--generations {cfg.generations}: {run_dir} has already finished generation "
                                  f"{state.gen}; pass more to extend it (nothing was changed)")
            echo(f"{run_dir} has already finished generation {state.gen}: nothing to do "
                 f"(--generations {state.gen + 1} or more extends it)")
            return run_dir
        try:
            write_bytes_atomic(run_dir / "config.toml", resolved.to_toml().encode())
        except OSError as exc:  # before any generation: bad --out, not a disk that filled during the run
            raise ConfigError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from None
        report_deaths(run_dir, echo)
        echo(f"nero-deap: {cfg.algorithm} on {cfg.grammar}, {cfg.data}, objectives {cfg.objectives}, "
             f"population {cfg.population}, {cfg.generations} generations, {cfg.epochs:g} epochs/candidate "
             f"-> {run_dir}")
        if state is not None:
            echo(f"resumed after generation {state.gen}")
        else:
            state = _fresh_state(run_dir, toolbox, cfg, constraint, echo)
        while state.gen < cfg.generations:
            start = time.perf_counter()
            with stop_on_fatal_device_error(run_dir, checkpointed=True):
                evaluated = generation(state, toolbox, cfg.cxpb, cfg.mutpb, constraint,
                                       progress_bar(state.gen + 1))
            record(run_dir, state, evaluated, toolbox, time.perf_counter() - start, cfg, echo)
        echo(f"done: {len(state.archive)} architecture(s) on the Pareto front -> {run_dir / 'pareto.csv'}")
        echo(front_table(state.archive, objectives, toolbox))
        if (run_dir / "inflight").is_dir() and not any((run_dir / "inflight").iterdir()):
            (run_dir / "inflight").rmdir()  # the notes of candidates under evaluation: none left, so no folder
    return run_dir
