#!/usr/bin/env bash
# Issue #9's experiment: NSGA-II on clean,fgsm vs NSGA-II on clean,pgd5 vs random search, same budget
# ($CONFIG), seeds $SEEDS; then `final` (standard retraining, PGD-20, AutoAttack on 100 of 300 test
# images) on the 3 front members with the best normalised sum of every run; a report grouping all runs.
# All searches run first, then the finals seed by seed, so a cut-short experiment still has whole groups.
# Usage: [CONFIG=configs/signal-cpu.toml] [SEEDS="1 2"] [FINAL_SEEDS="1 2"] bash experiments/robust_signal.sh [OUT]
#   configs/signal-cpu.toml: the reduced run (about an hour with finals on seed 1 only, FINAL_SEEDS=1);
#   configs/signal-cpu-90.toml: the issue's scale (about 90 minutes of the two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/signal}
CONFIG=${CONFIG:-configs/signal-cpu.toml}
SEEDS=${SEEDS:-1 2}
FINAL_SEEDS=${FINAL_SEEDS:-$SEEDS}
RUN="python run.py"
for seed in $SEEDS; do
  $RUN search --config "$CONFIG" --seed "$seed" --out "$OUT/nsga2-fgsm-s$seed"
  $RUN search --config "$CONFIG" --seed "$seed" --objectives clean,pgd5 --out "$OUT/nsga2-pgd5-s$seed"
  $RUN search --config "$CONFIG" --seed "$seed" --algorithm random --out "$OUT/random-fgsm-s$seed"
done
for seed in $FINAL_SEEDS; do
  for run in nsga2-fgsm nsga2-pgd5 random-fgsm; do
    $RUN final "$OUT/$run-s$seed" --select pareto --top 3 --skip-search-stage --epochs 4 --train-subset 4000 \
        --test-n 300 --aa-n 100 --sweep-n 100 --accelerate on --threads 2
  done
done
$RUN report "$OUT"/*-s[0-9]* --out "$OUT/report"
