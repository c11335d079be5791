"""Whether a run reached a generation: exit status 0 if ``RUN/gens.csv`` holds generation GEN or a later one, 1 if
not (or if it is missing or unreadable).

    python experiments/reached.py RUN GEN

Why: scoop 0.7.2's launcher exits 0 whatever happened to the search, so the experiment scripts
(``experiments/fidelity_halving.sh``) and the GPU check (``bench/gpu_check.sh``) judge a search by what it
wrote instead.
"""
import sys

import pandas as pd


def reached(run: str, generation: int) -> bool:
    """True if ``run``'s gens.csv has a row of generation ``generation`` or later."""
    try:
        return int(pd.read_csv(f"{run}/gens.csv").gen.max()) >= generation
    except (OSError, ValueError, AttributeError, pd.errors.ParserError):
        return False


if __name__ == "__main__":
    sys.exit(0 if reached(sys.argv[1], int(sys.argv[2])) else 1)
