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

from .config import RunConfig
from .fitness import derive_seed, evaluate_phenotype
from .objectives import parse as parse_objectives
from .phenotype import Phenotype


def read_phenotype(text_or_path: str) -> Phenotype:
    """A phenotype from its text form, or from a file of it (``#`` comments and line breaks allowed)."""
    path = Path(text_or_path)
    text = text_or_path
    if "|" not in text_or_path and path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        text = " ".join(line for line in lines if line)
    return Phenotype.from_text(text)


def evaluate_architecture(phenotype: Phenotype, cfg: RunConfig, individual_id: int = 0) -> dict:
    """Train and score ``phenotype`` under ``cfg``'s protocol; returns objectives by name plus metadata."""
    from .search import eval_context
    from .structure import NetworkStructure

    ctx = replace(eval_context(cfg, NetworkStructure.from_config(cfg.structure)), pause_at=None)  # full budget
    values, meta = evaluate_phenotype(phenotype, ctx, derive_seed(cfg.seed, individual_id))
    meta.pop("weights", None)
    result = {o.name: v for o, v in zip(parse_objectives(cfg.objectives), values)}
    return {**result, **{k: meta[k] for k in ("params", "flops", "epochs", "train_s", "status", "reason")},
            "phenotype": phenotype.to_text()}


def result_line(result: dict, cfg: RunConfig) -> str:
    scores = "  ".join(f"{o.name} {result[o.name]:.4g}" for o in parse_objectives(cfg.objectives))
    return (f"{scores}  params {result['params']:,}  flops {result['flops']:,}  "
            f"train {result['train_s']:.1f}s  {result['status']}{'  ' + result['reason'] if result['reason'] else ''}")


def result_json(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
