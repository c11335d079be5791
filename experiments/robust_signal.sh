#!/usr/bin/env bash
# Issue #9's experiment: NSGA-II on clean,fgsm vs NSGA-II on clean,pgd5 vs random search, same budget
# (configs/signal-cpu.toml), two seeds each; `final` (standard retraining, PGD-20, AutoAttack on 100
# of 300 test images) on the 3 front members with the best normalised sum of each seed-1 run; a report grouping all runs.
# Seed 1 (searches and finals) runs first, so a cut-short run still has one complete seed.
# Usage: bash experiments/robust_signal.sh [OUT]   (default runs/signal; about an hour on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/signal}
RUN="python run.py"
search_group() {  # seed
  $RUN search --config configs/signal-cpu.toml --seed "$1" --out "$OUT/nsga2-fgsm-s$1"
  $RUN search --config configs/signal-cpu.toml --seed "$1" --objectives clean,pgd5 --out "$OUT/nsga2-pgd5-s$1"
  $RUN search --config configs/signal-cpu.toml --seed "$1" --algorithm random --out "$OUT/random-fgsm-s$1"
}
search_group 1
for run in nsga2-fgsm-s1 nsga2-pgd5-s1 random-fgsm-s1; do
  $RUN final "$OUT/$run" --select pareto --top 3 --skip-search-stage --epochs 4 --train-subset 4000 \
      --test-n 300 --aa-n 100 --sweep-n 100 --accelerate on --threads 2
done
search_group 2
$RUN report "$OUT"/*-s[12] --out "$OUT/report"
