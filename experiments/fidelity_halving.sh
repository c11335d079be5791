#!/usr/bin/env bash
# Issue #12's experiment: the plain search against --fidelity halving (a third of the budget for all,
# the best half on to the full budget), seeds $SEEDS, $CONFIG (default configs/fidelity-cpu.toml; an empty
# CONFIG= runs the README's defaults, 5 epochs on the whole training split: a GPU's work); then
# experiments/summarize_fidelity.py compares them at the largest wall-clock budget every run reached.
# Usage: [SEEDS="1 2"] [CONFIG=file.toml] bash experiments/fidelity_halving.sh [OUT]    (about 25 minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fidelity}
SEEDS=${SEEDS:-1 2}
CONFIG=${CONFIG-configs/fidelity-cpu.toml}
CFG=(${CONFIG:+--config "$CONFIG"})
for seed in $SEEDS; do
  python run.py search "${CFG[@]}" --seed "$seed" --generations 3 --out "$OUT/full-s$seed"
  python run.py search "${CFG[@]}" --seed "$seed" --generations 5 --fidelity halving \
      --out "$OUT/halving-s$seed"
done
python experiments/summarize_fidelity.py "$OUT"
