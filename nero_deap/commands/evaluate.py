"""``evaluate``: score one hand-written architecture with exactly a run's fitness protocol.

Why: a search's numbers mean little without reference points.  Given a
phenotype (its one-line text form, or a file holding it) and a run's
configuration (or the same options as a search), this trains and scores it
as the search would have scored a candidate: same data split, budget,
objectives, attack and seed derivation.  With ``individual_id`` set to an id
of that run it reproduces the run's own evaluation (exactly, on the CPU).
Reference phenotypes ship in ``grammars/reference/``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..search.fitness import derive_seed, evaluate_phenotype
from ..search.objectives import parse as parse_objectives
from ..space.phenotype import Phenotype
from ..space.structure import NetworkStructure
from ..store.config import RunConfig
from .search import check_protocol, eval_context

MAX_PHENOTYPE_BYTES = 1 << 20


def read_phenotype(text_or_path: str) -> Phenotype:
    """A phenotype from its text form, or from a file of it (``#`` comments and line breaks allowed; a
    byte-order mark, as Windows editors write, is skipped).  ValueError/OSError say what is wrong."""
    if "|" in text_or_path:
        return Phenotype.from_text(text_or_path)
    path = Path(text_or_path)
    if not path.exists():
        raise ValueError("no such file (and not a phenotype: its text has ' || ' between the layers and the "
                         "learning part)")
    if not path.is_file() or path.stat().st_size > MAX_PHENOTYPE_BYTES:
        raise ValueError(f"not a regular file of at most {MAX_PHENOTYPE_BYTES} bytes")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    lines = [line.split("#", 1)[0].strip() for line in content.splitlines()]
    return Phenotype.from_text(" ".join(line for line in lines if line))


def evaluate_architecture(phenotype: Phenotype, cfg: RunConfig, individual_id: int = 0) -> dict:
    """Train and score ``phenotype`` under ``cfg``'s protocol; returns objectives by name plus metadata."""
    ctx = replace(eval_context(cfg, NetworkStructure.from_config(cfg.structure)), pause_at=None)  # full budget
    check_protocol(ctx)
    values, meta = evaluate_phenotype(phenotype, ctx, derive_seed(cfg.seed, individual_id))
    meta.pop("weights", None)
    result = {o.name: v for o, v in zip(parse_objectives(cfg.objectives), values)}
    return {**result, **{k: meta[k] for k in ("params", "flops", "epochs", "train_s", "status", "reason")},
            "phenotype": phenotype.to_text()}


def result_line(result: dict, cfg: RunConfig) -> str:
    """Accuracies to 4 digits, then the sizes once each (objectives or not), training time and status."""
    sizes = ("params", "flops")
    parts = [f"{o.name} {result[o.name]:.4g}" for o in parse_objectives(cfg.objectives) if o.name not in sizes]
    parts += [f"{name} {int(result[name]):,}" for name in sizes] + [f"train {result['train_s']:.1f}s",
                                                                     result["status"]]
    return "  ".join(parts + ([result["reason"]] if result["reason"] else []))


def result_json(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
