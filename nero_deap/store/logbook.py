"""Run outputs: CSV logbooks and atomic checkpoints under ``runs/<name>/``.

* ``gens.csv``: one row per generation (:func:`gen_columns`; ``resent``, the
  evaluations SCOOP re-sent, and ``flagged``, the archive members the masking
  audit flagged, are newer columns, as are ``train_s`` and ``audit_s`` (the
  seconds the generation's evaluations spent training and the audit spent
  attacking, summed over workers) and ``evals_per_h`` (evaluations per hour of
  wall clock) and ``stopped`` (candidates ``--fidelity halving`` stopped
  early): files written before them get them, empty for old rows, when a
  resume rewrites them);
* ``individuals.csv``: one row per evaluation (:func:`individual_columns`;
  ``fidelity`` is the share of the training budget its scores come from,
  below 1 only for candidates ``--fidelity halving`` stopped);
* ``pareto.csv``: the current non-dominated archive, same columns;
* ``checkpoint.pkl``: everything needed to resume, written with a
  temporary file and ``os.replace`` so a kill never leaves half a file;
  the one before it is kept as ``checkpoint.prev.pkl``, the fallback when
  the newest cannot be read.  Checkpoints hold plain data (genotypes,
  fitnesses, the logbook, RNG states as numbers and bytes), never weights,
  and load through a restricted unpickler that names only the classes they
  need (:func:`checkpoint_globals`), so a crafted file cannot run code, and
  carry the SHA-256 of their content, checked on load (:data:`CHECKPOINT_FORMAT`);
* ``weights/<id>.pt``: the search-time weights of the Pareto archive (or of
  every candidate), in :mod:`nero_deap.nets.export`'s model format.

Accuracies are fractions in [0,1]; every CSV loads with ``pandas.read_csv``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..common.errors import ConfigError
from ..common.files import write_bytes_atomic
from ..common.safe_pickle import ForbiddenGlobal, restricted_load
from ..search.evolution import ConstrainedFitness
from ..space.genotype import Gene, Genotype, Layer, Module

SIZE_COLUMNS = ["params", "flops"]  # logged for every evaluation, objectives or not
TIMING_COLUMNS = ["train_s", "wall_s", "audit_s", "evals_per_h"]  # differ between identical runs
STATS = ("avg", "std", "min", "max")


def individual_columns(objectives) -> list:
    """individuals.csv / pareto.csv: one column per objective (``clean_acc`` ...), then metadata."""
    measured = [o.column for o in objectives if o.column not in SIZE_COLUMNS]
    return ["gen", "id", "parents", *measured, *SIZE_COLUMNS, "train_s", "status", "reason", "audit_acc",
            "masking", "fidelity", "audit_s", "zero_grad", "phenotype"]


def gen_columns(objectives) -> list:
    """gens.csv: population statistics per objective, hypervolume, front size, failures, audit flags."""
    stats = [f"{o.name}_{stat}" for o in objectives for stat in STATS]
    return ["gen", "nevals", *stats, "hypervolume", "front_size", "failed", "wall_s", "resent", "flagged",
            "train_s", "audit_s", "evals_per_h", "stopped"]


def _csv_bytes(columns: list, rows: Iterable[dict], header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_csv(path: Path, columns: list, rows: Iterable[dict]) -> None:
    """Replace ``path`` atomically with these rows."""
    write_bytes_atomic(path, _csv_bytes(columns, rows, header=True))


def append_csv(path: Path, columns: list, rows: Iterable[dict]) -> None:
    path = Path(path)
    new = not path.exists()
    with open(path, "ab") as f:
        f.write(_csv_bytes(columns, rows, header=new))


def _read_records(path: Path) -> tuple:
    """``(records, problems)``: the CSV records of ``path``, read whatever bytes it holds (undecodable bytes and
    NULs become U+FFFD, which no whole row may hold), and what was wrong with it, for a message."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    problems = []
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = data.decode(errors="replace")
        problems.append("bytes that are not text")
    if "\0" in text:
        text = text.replace("\0", "\ufffd")
        problems.append("NUL bytes")
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:  # a stray quote made a field too long: read line by line (a quoted newline splits a row)
        records = []
        for line in text.splitlines():
            try:
                records.extend(csv.reader([line]))
            except csv.Error:
                records.append(["\ufffd"])
    return [r for r in records if r], problems  # blank lines are no rows (csv.DictReader skips them too)


def _sound(row: dict, integers: tuple, numbers: tuple) -> bool:
    """A whole row: nothing undecodable, non-negative integers and numbers (or nothing) where they belong."""
    if any("\ufffd" in value for value in row.values()):
        return False
    try:
        if any(int(row[c]) < 0 for c in integers):
            return False
        for c in numbers:
            if row.get(c, ""):
                float(row[c])
    except (KeyError, ValueError):
        return False
    return True


def _whole_rows(path: Path, columns: list, integers: tuple, numbers: tuple = ()) -> Optional[tuple]:
    """``(rows, dropped, problems)`` for the CSV at ``path`` (None if there is none): the rows that are whole and
    sound (as dicts, header order), how many records were not, and what else was wrong (empty, no header)."""
    if not path.exists():
        return None
    records, problems = _read_records(path)
    header = records[0] if records else []
    if header and set(integers) <= set(header) <= set(columns) and len(set(header)) == len(header):
        body = records[1:]
    else:  # empty, or a damaged first line: the rows may still be ours, in today's column order
        problems.append("no readable header" if records else "empty")
        header, body = columns, records
    rows, dropped = [], 0
    for record in body:
        row = dict(zip(header, record)) if len(record) == len(header) else None
        if row is None or not _sound(row, integers, numbers):
            dropped += 1
        else:
            rows.append(row)
    return rows, dropped, problems


def _as_written(columns: list, rows: list) -> list:
    """``rows`` as a CSV of ``columns`` gives them back (strings; a missing value is "")."""
    text = _csv_bytes(columns, rows, header=True).decode()
    return [{c: r.get(c) or "" for c in columns} for r in csv.DictReader(io.StringIO(text, newline=""))]


def _damage(problems: list, missing: str) -> str:
    return "; ".join(dict.fromkeys(problems + ([missing] if missing else [])))


def restore_gens(path: Path, columns: list, logbook: list, gen: int, source: str = "checkpoint.pkl") -> list:
    """Make gens.csv the checkpoint's ``logbook`` (its rows up to ``gen``); returns the lines to tell the user.

    The logbook holds every row gens.csv ever had, so a damaged, emptied, cut or deleted gens.csv is rebuilt
    whole from it; rows after ``gen`` (a killed run's, past its checkpoint) and half-written rows go as before.
    """
    path = Path(path)
    table = _whole_rows(path, columns, ("gen",))
    usable = all(isinstance(r, dict) and _generation(r) is not None for r in logbook)
    want = [r for r in logbook if usable and _generation(r) <= gen]
    if table is not None:
        rows, dropped, problems = table
        kept = [r for r in rows if _generation(r) <= gen]
        if not problems and (not usable or _as_written(columns, kept) == _as_written(columns, want)):
            write_csv(path, columns, kept if not usable else want)  # same rows; also brings an old header up to date
            return [f"{path.name}: dropped {dropped} incomplete row(s) left by a kill during a write"] * bool(dropped)
        missing = (f"{len(want) - len(kept)} of {len(want)} row(s) missing" if len(kept) < len(want)
                   else "rows that differ from the checkpoint's")
        damage = f"damaged ({_damage(problems, missing)})"
    else:
        damage = "missing"
    if not usable:
        raise ConfigError(f"{path}: {damage}, and {source}'s logbook cannot rebuild it; restore the file, or start "
                          "the run again")
    write_csv(path, columns, want)
    return [f"{path}: {damage}; rebuilt from {source} ({len(want)} row(s))"]


def restore_individuals(path: Path, columns: list, known: list, logbook: list, gen: int,
                        source: str = "checkpoint.pkl") -> list:
    """Bring individuals.csv back to the checkpoint (rows up to ``gen``); returns the lines to tell the user.

    The logbook's ``nevals`` says how many rows each generation wrote; the checkpoint holds only the rows of
    its population and archive (``known``, as :func:`individual_row` gives them).  A file with every row is
    cut back as before; otherwise its whole, sound rows are kept, the checkpoint's missing rows put back, and
    what neither holds is reported as lost, the damaged file kept beside it as ``individuals.csv.damaged``.
    """
    path = Path(path)
    numbers = tuple(columns[columns.index("parents") + 1:columns.index("train_s") + 1]) \
        if "parents" in columns and "train_s" in columns else ()  # the objectives, params, flops, train_s
    table = _whole_rows(path, columns, ("gen", "id"), numbers)
    expected = {}
    for r in logbook:
        try:
            expected[int(r["gen"])] = int(r["nevals"])
        except (TypeError, ValueError, KeyError):  # a logbook without counts: that generation is not checked
            pass
    rows, dropped, problems = table if table is not None else ([], 0, [])
    kept, ids, duplicates = [], set(), 0
    for r in rows:
        if _generation(r) <= gen:
            duplicates += int(r["id"]) in ids
            if int(r["id"]) not in ids:
                kept.append(r)
                ids.add(int(r["id"]))
    if duplicates:
        problems.append(f"{duplicates} duplicate row(s)")

    def short(present: list) -> dict:
        counts = Counter(_generation(r) for r in present)
        return {g: n - counts[g] for g, n in sorted(expected.items()) if g <= gen and counts[g] < n}

    short_kept = short(kept)
    if table is not None and not problems and not short_kept:
        write_csv(path, columns, kept)  # also brings an older run's header up to date
        return [f"{path.name}: dropped {dropped} incomplete row(s) left by a kill during a write"] if dropped else []
    restored = []
    for r in known:
        if _generation(r) is not None and _generation(r) <= gen and int(r["id"]) not in ids:
            restored.append(r)
            ids.add(int(r["id"]))
    merged = sorted(kept + restored, key=lambda r: (_generation(r), int(r["id"])))
    lost = short(merged)
    missing = f"{sum(short_kept.values())} row(s) missing" if short_kept else ""
    damage = f"damaged ({_damage(problems, missing)})" if table is not None else "missing"
    line = f"{path}: {damage}; rebuilt with {len(kept)} readable row(s) and {len(restored)} from {source}"
    if lost:
        line += (f"; {sum(lost.values())} row(s) of generation(s) {', '.join(map(str, lost))} are lost "
                 "(the checkpoint keeps only the population and the Pareto archive)")
        if table is not None and (problems or dropped) and path.stat().st_size:  # bytes no row was made of
            backup = path.with_name(path.name + ".damaged")
            if not backup.exists():  # the first damaged copy is the one worth keeping
                write_bytes_atomic(backup, path.read_bytes())
            line += f"; the damaged file is kept as {backup.name}"
    write_csv(path, columns, merged)
    return [line]


def _row_lines(path: Path) -> list:
    """The line each data row of a CSV starts on (a quoted field, a failure's reason, may hold newlines)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        starts, line = [], 1
        for _ in reader:
            starts.append(line)
            line = reader.line_num + 1
    return starts[1:]  # the header is not a data row


def _generation(row: dict) -> Optional[int]:
    try:
        return int(row["gen"])
    except (TypeError, ValueError):
        return None


def read_table(path: Path, required: list, numeric: list, scores: tuple = ()) -> "pd.DataFrame":
    """A run's CSV, checked: readable, with the ``required`` columns, finite numbers in the ``numeric`` and
    ``scores`` columns, and the ``scores`` of every successful row present, so a damaged file is one line
    naming it, not a traceback or a plot of garbage."""
    import numpy as np
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # empty, unparsable (pandas' errors are ValueErrors), binary
        raise ConfigError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    missing = [c for c in required if c not in frame]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in [c for c in dict.fromkeys([*numeric, *scores]) if c in frame]:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = (frame[column].notna() & values.isna()) | np.isinf(values)
        if bad.any():
            line = _row_lines(path)[int(np.flatnonzero(bad)[0])]
            raise ConfigError(f"{path}:{line}: {column} is not a finite number: {frame[column][bad].iloc[0]!r}")
        frame[column] = values
    ok = frame[frame.status == "ok"] if "status" in frame else frame
    empty = ok[list(scores)].isna().any(axis=1) if scores else pd.Series(False, index=ok.index)
    if empty.any():
        line = _row_lines(path)[int(ok.index[empty.to_numpy()][0])]
        raise ConfigError(f"{path}:{line}: a successful evaluation without its scores ({', '.join(scores)})")
    return frame


CHECKPOINT_KEYS = ("population", "archive", "logbook", "gen", "next_id", "rng")
CHECKPOINT_TYPES = {"population": list, "logbook": list, "gen": int, "next_id": int, "rng": dict}  # ints >= 0


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message names the file."""


class CorruptCheckpoint(CheckpointError):
    """Missing, truncated or damaged: the previous checkpoint may stand in for it."""


def previous_checkpoint(path: Path) -> Path:
    return Path(path).with_name(f"{Path(path).stem}.prev{Path(path).suffix}")


# A checkpoint is the pickled state inside an envelope holding its SHA-256: a flipped byte that still unpickles
# (a number in a fitness, a gene) once resumed a different run without a word.  Files without it: older runs.
CHECKPOINT_FORMAT = "nero-deap-checkpoint/2"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically, first copying the current checkpoint to ``checkpoint.prev.pkl``.

    Both writes are atomic, so at any moment at least one complete checkpoint
    exists: a crash while writing costs at most one generation.
    """
    path = Path(path)
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    data = pickle.dumps({"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                         "payload": payload}, protocol=pickle.HIGHEST_PROTOCOL)
    if path.exists():
        write_bytes_atomic(previous_checkpoint(path), path.read_bytes())
    write_bytes_atomic(path, data)


def checkpoint_globals() -> dict:
    """Everything a checkpoint may name, and what each name loads as.

    DEAP pickles its ``creator`` classes by value (``meta_create(name, base,
    dict)``); here that call only looks up the classes
    :mod:`nero_deap.search.evolution` created.  The rest are the genotype classes,
    the Pareto archive, and what checkpoints written before RNG states were
    stored as plain values name (numpy arrays, a torch byte tensor, read by
    ``torch.load(weights_only=True)``).
    """
    import collections
    import operator

    import numpy as np
    import torch
    from deap import creator, tools
    from numpy._core.numeric import _frombuffer

    def creator_class(name, base, dct):
        if name not in ("Individual", "FitnessMulti", "FitnessCleanFgsm"):  # FitnessCleanFgsm: before the registry
            raise ForbiddenGlobal("deap.creator", f"meta_create({name!r})", "a class nero-deap never creates")
        return getattr(creator, name)

    def legacy_storage(blob: bytes):
        try:
            return torch.load(io.BytesIO(blob), weights_only=True)
        except pickle.UnpicklingError:  # torch's own allow-list refused a global
            raise ForbiddenGlobal("torch.storage", "_load_from_bytes", "holding a pickle that names code") from None

    table = {("deap.creator", "meta_create"): creator_class, ("deap.tools.support", "ParetoFront"): tools.ParetoFront,
             ("_operator", "eq"): operator.eq}
    # each class under its module now and under the flat layout's module (runs written before the sub-packages)
    for module in ("nero_deap.search.evolution", "nero_deap.evolution"):
        table[(module, "ConstrainedFitness")] = ConstrainedFitness
    for module in ("nero_deap.space.genotype", "nero_deap.genotype"):
        table.update({(module, cls.__name__): cls for cls in (Gene, Genotype, Layer, Module)})
    table.update({  # legacy RNG states
        ("numpy", "dtype"): np.dtype, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): legacy_storage})
    return table


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint; :class:`CheckpointError` (one line naming the file) if it cannot be resumed from."""
    path = Path(path)
    allowed = checkpoint_globals()
    try:
        with open(path, "rb") as f:
            state = restricted_load(f, allowed)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            payload = state.get("payload")
            if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != state.get("sha256"):
                raise CorruptCheckpoint(f"{path}: damaged checkpoint: its content does not match the SHA-256 "
                                        "recorded when it was written")
            state = restricted_load(io.BytesIO(payload), allowed)
    except CheckpointError:
        raise
    except ForbiddenGlobal as exc:
        raise CheckpointError(f"{path}: refused, not a nero-deap checkpoint: it {exc}") from None
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot read checkpoint: {exc.strerror}") from None
    except Exception as exc:  # truncated or damaged: EOFError, UnpicklingError, ValueError, ...
        raise CorruptCheckpoint(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CorruptCheckpoint(f"{path}: not a nero-deap checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)})")
    wrong = [key for key, kind in CHECKPOINT_TYPES.items() if not isinstance(state[key], kind)
             or isinstance(state[key], bool) or (kind is int and state[key] < 0)]
    if wrong:  # the right keys with values a resume would trip over (an edited file)
        raise CorruptCheckpoint(f"{path}: not a nero-deap checkpoint ({', '.join(wrong)} of the wrong type or range)")
    return state


def load_checkpoint_or_previous(path: Path, echo: Callable = print) -> dict:
    """The checkpoint at ``path``, or, when it is missing or corrupt, ``checkpoint.prev.pkl``.

    After a fallback the previous checkpoint is copied over the bad one, so
    the next rotation keeps a good file; a refused (hostile) checkpoint never
    falls back: it is not a crash artefact.
    """
    path = Path(path)
    try:
        return load_checkpoint(path)
    except CorruptCheckpoint as newest:
        prev = previous_checkpoint(path)
        if not prev.exists():
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError:
            raise newest from None
        echo(f"warning: {newest}; resuming from {prev.name} (generation {state['gen']}) instead")
        write_bytes_atomic(path, prev.read_bytes())
        return state


# mkstemp's names for write_bytes_atomic: .<file>.<8 of [a-z0-9_]>
_TEMP_NAME = re.compile(r"\.(.+\.(?:pkl|csv|pt|toml))\.[a-z0-9_]{8}")


def temp_file_target(path: Path) -> Optional[str]:
    """The name of the file ``path`` was being written as by :func:`write_bytes_atomic`, if it is such a
    temporary file (``.config.toml.k2x9q_ab`` -> ``config.toml``); else None."""
    match = _TEMP_NAME.fullmatch(Path(path).name)
    return match.group(1) if match and Path(path).is_file() else None


def remove_temp_files(run_dir: Path) -> list:
    """Delete the temporary files a kill during :func:`write_bytes_atomic` left behind; returns them."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "weights"):
        for path in sorted(folder.glob(".*")) if folder.is_dir() else ():
            if temp_file_target(path):
                path.unlink()
                removed.append(path)
    return removed


def weights_file(run_dir: Path, individual_id: int) -> Path:
    return Path(run_dir) / "weights" / f"{int(individual_id)}.pt"


def store_weights(run_dir: Path, blobs: dict, keep: Optional[set]) -> None:
    """Write the weights in ``blobs`` (id -> bytes) to files, for ids in ``keep`` (None: all)."""
    for ind_id, blob in blobs.items():
        if keep is None or ind_id in keep:
            write_bytes_atomic(weights_file(run_dir, ind_id), blob)


def prune_weights(run_dir: Path, keep: set) -> None:
    """Delete weight files of ids no longer kept (left by dominated or never-committed candidates)."""
    folder = Path(run_dir) / "weights"
    for path in folder.glob("*.pt") if folder.is_dir() else ():
        if not path.stem.isdigit() or int(path.stem) not in keep:
            path.unlink(missing_ok=True)
