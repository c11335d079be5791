"""Layer 4, search: candidates scored and selected, as plain functions over a DEAP toolbox.

``objectives`` is the registry of what a candidate is scored on, ``fitness``
trains and scores one candidate (what the parallel map calls), ``audit``
attacks archive entrants harder to flag gradient masking, ``fidelity`` says
how much training each candidate gets, ``evolution`` holds NSGA-II and the
random baseline (the algorithms registry), ``parallel`` the SCOOP map and
device sharing, ``options`` the registry names a run configuration is
checked against.
"""
