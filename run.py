#!/usr/bin/env python
"""nero-deap entry point: ``python run.py --grammar grammars/cnn.grammar`` (see README).

SCOOP imports this file in every worker, so importing it stays cheap and
side-effect-free; it does create the DEAP ``creator`` classes (through
``nero_deap.evolution``), which workers need to unpickle individuals, and,
under SCOOP, applies :func:`nero_deap.parallel.patch_scoop` in every process
(root and workers) before any future runs.
"""
import os
import sys

from nero_deap import evolution  # noqa: F401  (creates the DEAP creator classes)
from nero_deap.cli import main
from nero_deap.parallel import patch_scoop, running_under_scoop

if running_under_scoop():
    patch_scoop()

if __name__ == "__main__":
    code = main()
    if code and running_under_scoop():
        # SCOOP runs this block as a future and prints a traceback for SystemExit:
        # leave with the exit code directly so users see one clean error line.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
