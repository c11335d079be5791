"""The run options that name an entry of a search-layer registry, each with the rule it must obey.

The run configuration (:mod:`nero_deap.store.config`) sits above the search
and validates against this table, which the commands hand to it, instead of
importing the search: each registry stays the only place that lists its
names, so a new objective, algorithm, fidelity or masking mode is added in
its own module and appears here, in ``--help`` and in validation at once.
"""
from __future__ import annotations

from typing import Callable, Collection, Union

from . import objectives
from .audit import MASKING_MODES
from .evolution import ALGORITHMS
from .fidelity import FIDELITIES


def check_audit(name: str) -> None:
    """The masking audit attacks with a robustness objective (``pgd20``), or is ``none``."""
    if name != "none" and not objectives.get(name).robust:
        raise ValueError(f"audit must be a robustness objective such as pgd20, or none, got {name!r}")


def option_checks() -> dict[str, Union[Collection[str], Callable[[str], object]]]:
    """``{option: names it may take, or a check that raises ValueError}``, for ``RunConfig.validate``."""
    return {"objectives": objectives.parse, "audit": check_audit, "algorithm": tuple(ALGORITHMS),
            "masking": MASKING_MODES, "fidelity": tuple(FIDELITIES)}
