"""The search command: config in, ``runs/<name>/`` out, resumable after any kill."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable

from deap import tools

from .config import ACCELERATE, ConfigError, RunConfig
from .evolution import (SearchState, evaluate_invalid, hypervolume_2d, initial_population, make_toolbox,
                        nsga2_generation)
from .fitness import EvalContext, died_in_flight, evaluate_remote, worker_raw
from .grammar import Grammar
from .logbook import (GEN_COLUMNS, INDIVIDUAL_COLUMNS, append_csv, load_checkpoint, prune_weights,
                      save_checkpoint, store_weights, truncate_after, write_csv)
from .operators import VariationRates
from .parallel import get_map
from .structure import NetworkStructure


def load_search_space(cfg: RunConfig, echo: Callable = print) -> tuple:
    """Grammar, structure and variation rates, validated (GrammarError / ConfigError)."""
    grammar = Grammar.from_file(cfg.grammar)
    try:
        structure = NetworkStructure.from_config(cfg.structure)
        rates = VariationRates.from_config(cfg.variation)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    for note in structure.adapt_defaults(grammar, cfg.structure):
        echo(f"note: {note}")
    structure.validate(grammar)
    return grammar, structure, rates


def _absolute_data(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def eval_context(cfg: RunConfig, structure: NetworkStructure) -> EvalContext:
    return EvalContext(
        grammar_path=str(Path(cfg.grammar).resolve()), structure_json=json.dumps(structure.to_config()),
        data=_absolute_data(cfg.data), val_size=cfg.val_size or None, train_subset=cfg.train_subset or None,
        split_seed=cfg.split_seed, epochs=cfg.epochs, max_seconds=cfg.max_seconds or None, eps=cfg.eps,
        device=cfg.device, workers_per_gpu=cfg.workers_per_gpu, threads=cfg.threads or None, run_seed=cfg.seed,
        accelerate=ACCELERATE[cfg.accelerate], return_weights=cfg.save_weights != "none",
        inflight_dir=str((cfg.run_dir() / "inflight").resolve()))  # report_deaths reads it


def report_deaths(run_dir: Path, echo: Callable, run_is_live: bool = False) -> None:
    """Say which candidates a process died on by a signal (no Python handler ran; see fitness.in_flight)."""
    for note in died_in_flight(str(run_dir / "inflight"), run_is_live):
        echo(f"warning: process {note['pid']} on {note['host']} died while evaluating candidate {note['id']} "
             f"of generation {note['gen']}: {note['phenotype']}")


def individual_row(ind, toolbox) -> dict:
    meta = getattr(ind, "meta", {})
    return {"gen": getattr(ind, "gen", 0), "id": ind.id, "parents": ";".join(map(str, ind.parents)),
            "clean_acc": ind.fitness.values[0], "fgsm_acc": ind.fitness.values[1],
            "params": meta.get("params", 0), "flops": meta.get("flops", 0),
            "train_s": round(meta.get("train_s", 0.0), 3), "status": meta.get("status", ""),
            "reason": meta.get("reason", ""), "phenotype": toolbox.phenotype_text(ind)}


def generation_row(gen: int, population: list, evaluated: list, archive, wall_s: float) -> dict:
    row = {"gen": gen, "nevals": len(evaluated)}
    for i, name in enumerate(("clean", "fgsm")):
        values = [ind.fitness.values[i] for ind in population]
        row.update({f"{name}_avg": statistics.fmean(values), f"{name}_std": statistics.pstdev(values),
                    f"{name}_min": min(values), f"{name}_max": max(values)})
    row["hypervolume"] = hypervolume_2d([ind.fitness.values for ind in archive])
    row["front_size"] = len(archive)
    row["failed"] = sum(1 for ind in evaluated if ind.meta.get("status") != "ok")
    row["wall_s"] = round(wall_s, 3)
    return row


def summary_line(row: dict, generations: int) -> str:
    return (f"gen {row['gen']:>3}/{generations}  evals {row['nevals']:>3}  "
            f"clean avg {row['clean_avg']:.3f} max {row['clean_max']:.3f}  "
            f"fgsm avg {row['fgsm_avg']:.3f} max {row['fgsm_max']:.3f}  "
            f"HV {row['hypervolume']:.4f}  front {row['front_size']}  failed {row['failed']}  {row['wall_s']:.1f}s")


def progress_bar(gen: int) -> Callable:
    def wrap(results, total):
        if not sys.stderr.isatty():
            return results
        from tqdm import tqdm

        return tqdm(results, total=total, desc=f"gen {gen}", unit="net", leave=False)
    return wrap


def _rng_states() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _restore_rng(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def record(run_dir: Path, state: SearchState, evaluated: list, toolbox, wall_s: float, cfg: RunConfig,
           echo: Callable) -> None:
    """Write this generation's weights and CSV rows, then the checkpoint (the commit point)."""
    keep = {ind.id for ind in state.archive} if cfg.save_weights == "front" else None
    store_weights(run_dir, evaluated, keep)
    append_csv(run_dir / "individuals.csv", INDIVIDUAL_COLUMNS, [individual_row(i, toolbox) for i in evaluated])
    row = generation_row(state.gen, state.population, evaluated, state.archive, wall_s)
    append_csv(run_dir / "gens.csv", GEN_COLUMNS, [row])
    write_csv(run_dir / "pareto.csv", INDIVIDUAL_COLUMNS, [individual_row(i, toolbox) for i in state.archive])
    save_checkpoint(run_dir / "checkpoint.pkl", {
        "population": state.population, "archive": state.archive, "logbook": state.gen_rows + [row],
        "gen": state.gen, "next_id": state.next_id, "rng": _rng_states()})
    state.gen_rows.append(row)
    if keep is not None:
        prune_weights(run_dir, keep)
    echo(summary_line(row, cfg.generations))
    report_deaths(run_dir, echo, run_is_live=True)


def run_search(cfg: RunConfig, resume: bool = False, echo: Callable = print) -> Path:
    grammar, structure, rates = load_search_space(cfg, echo)
    ctx = eval_context(cfg, structure)
    worker_raw(ctx.data)  # fail early (exit 2) on missing data; a serial map reuses it
    run_dir = cfg.run_dir()
    checkpoint = run_dir / "checkpoint.pkl"
    if resume and not checkpoint.exists():
        raise ConfigError(f"--resume {run_dir}: no checkpoint.pkl there")
    if not resume and checkpoint.exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    report_deaths(run_dir, echo)
    resolved = replace(cfg, structure=structure.to_config(), variation=asdict(rates))
    (run_dir / "config.toml").write_text(resolved.to_toml())
    toolbox = make_toolbox(grammar, structure, rates, partial(evaluate_remote, ctx=ctx), get_map())
    echo(f"nero-deap: {cfg.grammar} on {cfg.data}, population {cfg.population}, {cfg.generations} generations, "
         f"{cfg.epochs:g} epochs/candidate -> {run_dir}")
    if resume:
        saved = load_checkpoint(checkpoint)
        state = SearchState(saved["population"], saved["archive"], saved["gen"], saved["next_id"], saved["logbook"])
        _restore_rng(saved["rng"])
        for name, columns in (("individuals.csv", INDIVIDUAL_COLUMNS), ("gens.csv", GEN_COLUMNS)):
            truncate_after(run_dir / name, columns, state.gen)
        echo(f"resumed after generation {state.gen}")
    else:
        _seed_all(cfg.seed)
        for name in ("individuals.csv", "gens.csv", "pareto.csv"):
            (run_dir / name).unlink(missing_ok=True)
        prune_weights(run_dir, keep=set())  # leftovers of a run killed before its first checkpoint
        state = SearchState([], tools.ParetoFront())
        start = time.perf_counter()
        state.population = initial_population(toolbox, cfg.population, state)
        evaluated = evaluate_invalid(state.population, toolbox, cfg.min_clean, progress_bar(0))
        state.population = toolbox.select(state.population, len(state.population))  # assigns crowding distance
        state.archive.update(state.population)
        record(run_dir, state, evaluated, toolbox, time.perf_counter() - start, cfg, echo)
    while state.gen < cfg.generations:
        start = time.perf_counter()
        evaluated = nsga2_generation(state, toolbox, cfg.cxpb, cfg.mutpb, cfg.min_clean, progress_bar(state.gen + 1))
        record(run_dir, state, evaluated, toolbox, time.perf_counter() - start, cfg, echo)
    echo(f"done: {len(state.archive)} architecture(s) on the Pareto front -> {run_dir / 'pareto.csv'}")
    return run_dir
