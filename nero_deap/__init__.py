"""nero-deap: evolve CNNs that are adversarially robust by design (NERO-Net on DEAP).

The library entry points, each taking a settings object::

    from nero_deap import RunConfig, run_search, FinalSettings, run_final, ReportSettings, run_report

They are loaded on first use: ``import nero_deap`` stays cheap (no torch) for
SCOOP workers.
"""

__version__ = "0.1.0"

_LAZY = {  # name -> module that defines it
    "load_model": "export",
    "RunConfig": "config", "run_search": "search",
    "FinalSettings": "final", "run_final": "final",
    "ReportSettings": "report", "run_report": "report",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nero_deap' has no attribute {name!r}")
