"""``python -m nero_deap ...``: the ``nero-deap`` command.

SCOOP 0.7.2's launcher takes a script path, not ``-m``; this file is that
script for an installed package (README, "Parallel runs with SCOOP").  So it
imports absolutely, stays cheap and side-effect-free at import, creates
the DEAP ``creator`` classes that workers need to unpickle individuals, and
applies :func:`nero_deap.search.parallel.patch_scoop` under SCOOP (as run.py does).
"""
from nero_deap.cli import console_main
from nero_deap.search import evolution  # noqa: F401  (creates the DEAP creator classes)
from nero_deap.search.parallel import patch_scoop, running_under_scoop

if running_under_scoop():
    patch_scoop()

if __name__ == "__main__":
    console_main(prog="python -m nero_deap")
