"""Files shipped inside the package: the grammars.

``grammars/`` travels in the wheel as ``nero_deap/grammars`` (in a checkout
that is a link to the top-level ``grammars/``), so the default grammar
resolves after ``pip install`` from any working directory.
"""
from __future__ import annotations

from pathlib import Path

PACKAGED_GRAMMARS = Path(__file__).resolve().parent.parent / "grammars"


def packaged_grammars() -> list:
    return sorted(p.name for p in PACKAGED_GRAMMARS.glob("*.grammar"))


def grammar_file(spec: str) -> Path:
    """The grammar file ``spec`` names: a path as given when it exists; otherwise, for a bare name
    (``cnn.grammar``) or ``grammars/<name>``, the packaged grammar of that name; else ``spec`` unchanged
    (reading it then reports the missing file)."""
    path = Path(spec).expanduser()
    if path.exists() or str(path.parent) not in (".", "grammars"):
        return path
    packaged = PACKAGED_GRAMMARS / path.name
    return packaged if packaged.exists() else path
