"""Unpickling that cannot run code: a file may name only the globals its format needs.

``pickle.load`` imports and calls whatever function a file names, so a
crafted checkpoint or dataset batch could run any command.  Every callable a
pickle reaches goes through ``find_class``; :func:`restricted_load` answers
it from an explicit ``{(module, name): object}`` table and refuses the rest
with :class:`ForbiddenGlobal` before anything is called.  The tables
(checkpoints in :mod:`nero_deap.store.logbook`, CIFAR-10 batches in
:mod:`nero_deap.engine.sources`) hold only classes and functions that build plain data.
"""
from __future__ import annotations

import pickle
from typing import BinaryIO, Mapping


class ForbiddenGlobal(pickle.UnpicklingError):
    """The file names a global outside the allowed table (a hostile or foreign file)."""

    def __init__(self, module: str, name: str, why: str = "which this file format never holds"):
        super().__init__(f"refers to {module}.{name}, {why}")
        self.module, self.name = module, name


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: Mapping[tuple, object], **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_load(file: BinaryIO, allowed: Mapping[tuple, object], **kwargs):
    """``pickle.load(file, **kwargs)`` where only the globals in ``allowed`` can be named."""
    return _RestrictedUnpickler(file, allowed, **kwargs).load()
