"""Layer 6, commands: what a user runs, each a library function taking a settings object.

``search`` (run_search), ``final`` (run_final: retrain, attack, audit on the
test split), ``report`` (plots and tables of runs), ``evaluate`` (score one
architecture with a run's protocol), ``agreement`` (does the search's ranking
hold in ``final``).  ``nero_deap.cli`` turns command lines into their settings.
"""
