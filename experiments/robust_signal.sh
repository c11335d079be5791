#!/usr/bin/env bash
# Issue #9's experiment: NSGA-II on clean,fgsm vs NSGA-II on clean,pgd5 vs random search, same budget
# ($CONFIG), seeds $SEEDS; then `final` (standard retraining, PGD-20, AutoAttack on 100 of 300 test
# images) on the 3 front members with the best normalised sum of every run; a report grouping all runs.
# All searches run first, then the finals seed by seed, so a cut-short experiment still has whole groups.
# Usage: [CONFIG=configs/signal-cpu.toml] [SEEDS="1 2"] [FINAL_SEEDS="1 2"] [ARMS="nsga2-fgsm random-fgsm"]
#        [EXTRA="--generations 10"] bash experiments/robust_signal.sh [OUT]
#   configs/signal-cpu.toml: the reduced run (about an hour with finals on seed 1 only, FINAL_SEEDS=1);
#   configs/signal-cpu-90.toml: the issue's scale (about 90 minutes of the two cores).
#   ARMS: which of the three groups to run (default all); FINAL_SEEDS=none: no finals; EXTRA: more search
#   options for every group (a longer search: EXTRA="--generations 10").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/signal}
CONFIG=${CONFIG:-configs/signal-cpu.toml}
SEEDS=${SEEDS:-1 2}
FINAL_SEEDS=${FINAL_SEEDS:-$SEEDS}
[ "$FINAL_SEEDS" = none ] && FINAL_SEEDS=
ARMS=${ARMS:-nsga2-fgsm nsga2-pgd5 random-fgsm}
EXTRA=${EXTRA:-}
RUN="python run.py"
declare -A OPTIONS=([nsga2-fgsm]="" [nsga2-pgd5]="--objectives clean,pgd5" [random-fgsm]="--algorithm random")
for group in $ARMS; do
  [ -n "${OPTIONS[$group]+set}" ] || { echo "unknown group $group (nsga2-fgsm, nsga2-pgd5, random-fgsm)" >&2; exit 2; }
done
for seed in $SEEDS; do
  for group in $ARMS; do
    # shellcheck disable=SC2086  # the options are words
    $RUN search --config "$CONFIG" --seed "$seed" ${OPTIONS[$group]} $EXTRA --out "$OUT/$group-s$seed"
  done
done
for seed in $FINAL_SEEDS; do
  for run in $ARMS; do
    $RUN final "$OUT/$run-s$seed" --select pareto --top 3 --skip-search-stage --epochs 4 --train-subset 4000 \
        --test-n 300 --aa-n 100 --sweep-n 100 --accelerate on --threads 2
  done
done
$RUN report "$OUT"/*-s[0-9]* --out "$OUT/report"
