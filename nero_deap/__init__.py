"""nero-deap: evolve CNNs that are adversarially robust by design (NERO-Net on DEAP).

The library entry points, each taking a settings object::

    from nero_deap import RunConfig, run_search, FinalSettings, run_final, ReportSettings, run_report

They are loaded on first use: ``import nero_deap`` stays cheap (no torch) for
SCOOP workers.
"""

__version__ = "0.1.0"

_LAZY = {  # name -> module that defines it
    "load_model": "nets.export",
    "RunConfig": "store.config", "run_search": "commands.search",
    "FinalSettings": "commands.final", "run_final": "commands.final",
    "ReportSettings": "commands.report", "run_report": "commands.report", "load_run": "commands.report",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nero_deap' has no attribute {name!r}")
