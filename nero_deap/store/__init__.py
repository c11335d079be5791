"""Layer 5, store: what a run keeps on disk.

``config`` is the run configuration (defaults, TOML, command-line
overrides, resume rules), ``logbook`` the CSV tables and checkpoints,
``runlock`` the lock that keeps two processes out of one run directory.
"""
