"""Run outputs: CSV logbooks and atomic checkpoints under ``runs/<name>/``.

* ``gens.csv``: one row per generation (:data:`GEN_COLUMNS`);
* ``individuals.csv``: one row per evaluation (:data:`INDIVIDUAL_COLUMNS`);
* ``pareto.csv``: the current non-dominated archive, same columns;
* ``checkpoint.pkl``: everything needed to resume, written with a
  temporary file and ``os.replace`` so a kill never leaves half a file;
* ``weights/<id>.pt``: the search-time weights of the Pareto archive (or of
  every candidate), in :mod:`nero_deap.export`'s model format.

Accuracies are fractions in [0,1]; every CSV loads with ``pandas.read_csv``.
"""
from __future__ import annotations

import csv
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterable, Optional

GEN_COLUMNS = ["gen", "nevals", "clean_avg", "clean_std", "clean_min", "clean_max", "fgsm_avg", "fgsm_std",
               "fgsm_min", "fgsm_max", "hypervolume", "front_size", "failed", "wall_s"]
INDIVIDUAL_COLUMNS = ["gen", "id", "parents", "clean_acc", "fgsm_acc", "params", "flops", "train_s", "status",
                      "reason", "phenotype"]
TIMING_COLUMNS = ["train_s", "wall_s"]


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``; readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _csv_bytes(columns: list, rows: Iterable[dict], header: bool) -> bytes:
    import io

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


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate_after(path: Path, columns: list, gen: int) -> None:
    """Drop rows of generations after ``gen``: what a killed run wrote past its checkpoint."""
    path = Path(path)
    if path.exists():
        write_csv(path, columns, [r for r in read_csv(path) if int(r["gen"]) <= gen])


def save_checkpoint(path: Path, state: dict) -> None:
    write_bytes_atomic(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint this program wrote (pickle: only open files you trust)."""
    from . import evolution  # noqa: F401  - the DEAP creator classes must exist to unpickle

    with open(path, "rb") as f:
        return pickle.load(f)


def weights_file(run_dir: Path, individual_id: int) -> Path:
    return Path(run_dir) / "weights" / f"{int(individual_id)}.pt"


def store_weights(run_dir: Path, evaluated: list, keep: Optional[set]) -> None:
    """Move the weights workers returned in ``meta['weights']`` to files, for ids in ``keep`` (None: all).

    The bytes always leave ``meta``, so they never reach a checkpoint or a clone.
    """
    for ind in evaluated:
        blob = getattr(ind, "meta", {}).pop("weights", None)
        if blob is not None and (keep is None or ind.id in keep):
            write_bytes_atomic(weights_file(run_dir, ind.id), blob)


def prune_weights(run_dir: Path, keep: set) -> None:
    """Delete weight files of ids no longer kept (left by dominated or never-committed candidates)."""
    folder = Path(run_dir) / "weights"
    for path in folder.glob("*.pt") if folder.is_dir() else ():
        if not path.stem.isdigit() or int(path.stem) not in keep:
            path.unlink(missing_ok=True)
