"""nero-deap's one folder in the user's cache: ``$XDG_CACHE_HOME/nero-deap`` (default ``~/.cache/nero-deap``).

Decoded datasets go to ``data/`` below it (``$NERO_DEAP_CACHE`` moves them
elsewhere) and the built C kernels to ``kernels/``; there used to be two
folders (``nero_deap`` and ``nero-deap``), which left a user guessing which
one to clear.
"""
from __future__ import annotations

import os
from pathlib import Path


def user_cache() -> Path:
    """``$XDG_CACHE_HOME/nero-deap``, default ``~/.cache/nero-deap``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nero-deap"
