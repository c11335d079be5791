#!/usr/bin/env bash
# Issue #12's experiment: the plain search against --fidelity halving (a third of the budget for all,
# the best half on to the full budget), seeds $SEEDS, $CONFIG (default configs/fidelity-cpu.toml; an empty
# CONFIG= runs the README's defaults, 5 epochs on the whole training split: a GPU's work); then
# experiments/summarize_fidelity.py compares them at the largest wall-clock budget every run reached.
# Usage: [SEEDS="1 2"] [CONFIG=file.toml] bash experiments/fidelity_halving.sh [OUT]
#        (the default config: 4-12 minutes a seed on two cores, 2026-11-27)
# Only the extension of finished halving runs (to their plain twin's wall clock):
#        EXTEND_ONLY=1 [SEEDS=...] bash experiments/fidelity_halving.sh OUT
# On a GPU machine (BENCHMARKS.md, "GPU check"): LAUNCH runs the searches (e.g. "python3 -m scoop -n 8"),
# EXTRA adds options to both arms (e.g. "--device cuda --workers-per-gpu 8 --population 8"), FULL_GENS and
# HALVING_GENS (3 and 5) set each arm's generations, EXTEND=0 skips the extension (the summary then cuts
# both runs at the shorter one's wall clock), PY names the python (python).  LAUNCH and EXTRA are split on
# spaces: no paths with spaces in them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fidelity}
SEEDS=${SEEDS:-1 2}
CONFIG=${CONFIG-configs/fidelity-cpu.toml}
CFG=(${CONFIG:+--config "$CONFIG"})
PY=${PY:-python}
read -r -a LAUNCH <<<"${LAUNCH:-$PY}"
read -r -a EXTRA <<<"${EXTRA:-}"
# scoop's launcher exits 0 whatever happened (LAUNCH="python -m scoop ..."): an arm passed only if its
# gens.csv reached the generation it was asked for
finished() {
  "$PY" experiments/reached.py "$1" "$2" 2>/dev/null ||
      { echo "error: $1 did not reach generation $2 (see its output above)" >&2; exit 1; }
}
# Equal wall clock: the halving search goes on, one generation at a time (--resume), until it has run as
# long as the plain search of its seed (its generations get cheaper than the plain search's as those grow).
extend_halving() {
  local next
  while next=$("$PY" -c 'import sys, pandas as pd
h, f = (pd.read_csv(d + "/gens.csv") for d in sys.argv[1:])
print(int(h.gen.max()) + 1 if h.wall_s.sum() < f.wall_s.sum() and h.gen.max() < 30 else "")' \
      "$OUT/halving-s$1" "$OUT/full-s$1") && [ -n "$next" ]; do
    "${LAUNCH[@]}" run.py --resume "$OUT/halving-s$1" --generations "$next"
    finished "$OUT/halving-s$1" "$next"
  done
}

for seed in $SEEDS; do
  if [ -n "${EXTEND_ONLY:-}" ]; then extend_halving "$seed"; continue; fi
  "${LAUNCH[@]}" run.py search "${CFG[@]}" "${EXTRA[@]}" --seed "$seed" --generations "${FULL_GENS:-3}" \
      --out "$OUT/full-s$seed"
  finished "$OUT/full-s$seed" "${FULL_GENS:-3}"
  "${LAUNCH[@]}" run.py search "${CFG[@]}" "${EXTRA[@]}" --seed "$seed" --generations "${HALVING_GENS:-5}" \
      --fidelity halving --out "$OUT/halving-s$seed"
  finished "$OUT/halving-s$seed" "${HALVING_GENS:-5}"
  [ "${EXTEND:-1}" = 0 ] || extend_halving "$seed"
done
"$PY" experiments/summarize_fidelity.py "$OUT"
