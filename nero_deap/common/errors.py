"""The error every layer raises for bad user input, so the command line can print it as one line.

Why a module of its own: the grammar, the data, the run files and the
configuration all reject input, and each layer must be able to say so without
importing the configuration (which sits above them).  ``cli`` catches
:class:`ConfigError` and prints ``error: <message>`` with exit code 2.
"""
from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A bad configuration value or run file; the message names the key or file and what is expected.

    ``key``, where known, is the configuration key that failed, so a caller
    can name the file it came from (:func:`nero_deap.store.config.resolve`).
    """

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key
