#!/usr/bin/env bash
# Issue #12's experiment: the plain search against --fidelity halving (a third of the budget for all,
# the best half on to the full budget), seeds $SEEDS, configs/fidelity-cpu.toml; then
# experiments/summarize_fidelity.py compares them at the largest wall-clock budget every run reached.
# Usage: [SEEDS="1 2"] bash experiments/fidelity_halving.sh [OUT]    (about 25 minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fidelity}
SEEDS=${SEEDS:-1 2}
for seed in $SEEDS; do
  python run.py search --config configs/fidelity-cpu.toml --seed "$seed" --generations 3 --out "$OUT/full-s$seed"
  python run.py search --config configs/fidelity-cpu.toml --seed "$seed" --generations 5 --fidelity halving \
      --out "$OUT/halving-s$seed"
done
python experiments/summarize_fidelity.py "$OUT"
