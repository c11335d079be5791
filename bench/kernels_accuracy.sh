#!/usr/bin/env bash
# Accuracy at equal epochs with the C kernels (nero_deap/native.py) and without them (NERO_DEAP_NATIVE=0, torch's
# kernels), bf16 on the CPU: the reference network, the same seeds, alternating.  BENCHMARKS.md, issue #12.
#     bash bench/kernels_accuracy.sh [SEEDS] [TRAIN_IMAGES] [EPOCHS] [TEST_IMAGES]     (default "1 2 3" 10000 5 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-"1 2 3"}; n=${2:-10000}; epochs=${3:-5}; test_n=${4:-2000}
for seed in $seeds; do
    for kernels in 1 0; do
        echo "# seed $seed, NERO_DEAP_NATIVE=$kernels"
        NERO_DEAP_NATIVE=$kernels python bench/bench_engine.py --train-subset "$n" --epochs "$epochs" \
            --test-n "$test_n" --accelerate on --skip-baseline --skip-limit --seed "$seed" | grep -E "native|nero-deap:"
    done
done
