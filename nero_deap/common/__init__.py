"""Layer 0, common: what every layer needs and nothing nero-deap-specific.

``errors`` (the one-line user error), ``files`` (atomic writes),
``safe_pickle`` (unpickling that cannot run code), ``resources`` (the
grammars shipped in the package).  Imports nothing else from the package.
"""
