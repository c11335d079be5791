#!/usr/bin/env python
"""nero-deap from a checkout: ``python run.py [search|final|report|evaluate] ...`` (see README).

The same command as the installed ``nero-deap``; without a subcommand it
runs a search.  SCOOP imports this file in every worker, so importing it
stays cheap and side-effect-free; it does create the DEAP ``creator``
classes (through ``nero_deap.search.evolution``), which workers need to unpickle
individuals, and, under SCOOP, applies :func:`nero_deap.search.parallel.patch_scoop`
in every process (root and workers) before any future runs.
"""
from nero_deap.cli import console_main
from nero_deap.search import evolution  # noqa: F401  (creates the DEAP creator classes)
from nero_deap.search.parallel import patch_scoop, running_under_scoop

if running_under_scoop():
    patch_scoop()

if __name__ == "__main__":
    console_main(prog="run.py")
