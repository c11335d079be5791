#!/usr/bin/env bash
# One-shot GPU check: the first thing a session lent a GPU runs (BENCHMARKS.md, "GPU check").
#
#   bench/gpu_check.sh            on the lent GPU machine; at most about 9 minutes on one H100 (step limits):
#     1. installs, from the wheels in .whl/, only the packages its python3 lacks (deap, scoop, ...)
#     2. the CUDA tests: tests/test_device_paths.py and tests/test_gpu_ready.py
#     3. bench/bench_engine.py on the full training split, 2 epochs, against the plain-PyTorch baseline
#     3b. bench/bench_engine.py --compile: does torch.compile pay within one candidate's budget on this GPU?
#     3c. bench/bench_engine.py --profile: where the engine's GPU time goes (operators by device time, in the log),
#         and --interleave: do its convolutions run at the limit, and how long is the rest per image?
#     4. a real search on CIFAR-10 (JPEG) under SCOOP, 2 workers on the GPU, population 8, 2 generations
#     5. `run.py final` on its best architecture (by FGSM) with PGD-20 and AutoAttack on 500 test images
#     6. one markdown summary, printed and written to $OUT/summary.md (with the logs and CSVs beside it);
#        rewritten after every step, so a device call cut off at its time limit still returns what was done
#   bench/gpu_check.sh --throughput   on the lent GPU machine, about 4 minutes on one H200 (estimated: a and b
#                                 took 46 and 69 s there, c about as long as b): evaluations per
#                                 hour at the README's default fidelity (5 epochs on 45,000 images, 5,000
#                                 validation, audit on 1,000): a. the 4 architectures of BENCHMARKS.md's CPU row
#                                 (population 4, generation 0, default seed), one worker; b. a search under
#                                 SCOOP, population 16, 1 generation (up to 32 evaluations), 4 workers sharing the
#                                 GPU; c. the same with 8 (the same 16 architectures in generation 0)
#   bench/gpu_check.sh --dry-run  anywhere, on the CPU: the same steps with tiny settings and synthetic data
#                                 (--dry-run --throughput: the throughput steps so)
#
# Needs .whl/ and .data/cifar10-jpeg.zip, made by bench/prepare_gpu_check.sh.  Each step has a time
# limit; a failing step is reported and the next one still runs.  Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=full
STEPSET=check
for arg in "$@"; do
    case $arg in
        --dry-run) MODE=dry ;;
        --throughput) STEPSET=throughput ;;
        *) echo "usage: bench/gpu_check.sh [--dry-run] [--throughput]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
OUTDIR=${OUT:-runs/gpu-check}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
RUN=$WORK/search
mkdir -p "$OUTDIR"
export NERO_DEAP_CACHE=$WORK/cache NERO_DEAP_LOCKS=$WORK/locks PYTHONUNBUFFERED=1 MPLBACKEND=Agg
. bench/step.sh
begin_steps "$OUTDIR/gpu_check.log" "$WORK" 3

# step NAME LIMIT_S COMMAND...: bench/step.sh's run_step (its last 3 lines shown), then the summary so far
step() {
    run_step "$@"
    local rc=$?
    summarize
    return $rc
}

# unfinished STEP RUN LAST_GEN: scoop 0.7.2's launcher exits 0 whatever happened, so a search step passed
# only if its run wrote generation LAST_GEN; else its row in the steps table is marked failed
unfinished() {
    "$PY" experiments/reached.py "$2" "$3" 2>/dev/null || sed -i "s/^$1\t0\t/$1\tno-gens.csv\t/" "$STEPS"
}

# the packages the GPU image lacks (bench/step.sh)
echo "=== install" | tee -a "$LOG"
start=$(date +%s)
install_missing >"$WORK/install.out" 2>&1  # not in a pipeline: its export must reach this shell
printf 'install\t%s\t%s\n' "$?" "$(($(date +%s) - start))" >>"$STEPS"
tee -a "$LOG" <"$WORK/install.out"

# the machine, once (the summary after each step must not import torch again)
"$PY" - >"$WORK/device.txt" 2>/dev/null <<'EOF' || echo "torch: not importable" >"$WORK/device.txt"
import subprocess

import torch

gpu = "none"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    try:
        gpu += ", driver " + subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; GPU: {gpu}")
EOF
# the summary, rewritten after every step: a device call cut off at its time limit still leaves what was done
cat >"$WORK/summary.py" <<'EOF'
import re, sys
from pathlib import Path

import pandas as pd

mode, work, run, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()]


def text(name):
    path = work / f"{name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def last_match(pattern, name):
    found = re.findall(pattern, text(name), re.M)
    return found[-1] if found else "n/a"


def table(frame, floatfmt="{:.3f}"):
    """A markdown table (no tabulate needed)."""
    cell = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)
    rows = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(rows + ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)])


def top_operators(log, n=5):
    """The first ``n`` operators of torch.profiler's table (sorted by device time on a GPU), or n/a."""
    lines = log.splitlines()
    head = next((i for i, line in enumerate(lines) if line.lstrip().startswith("Name ")), None)
    if head is None:
        return "n/a"
    rows = [line for line in lines[head + 2:] if line.strip() and not line.startswith("-")][:n]
    return "top operators (gpu_check.log has the table): " + ", ".join(row[:40].strip() for row in rows)


speeds = re.findall(r"^\s*(nero-deap|plain-pytorch): +(\d+) images/s", text("bench"), re.M)
results = {
    "install": last_match(r"^(nothing to install|installing .*)$", "install")[:200],
    "tests": last_match(r"^(\d+ (?:passed|failed).*|.*error.*)$", "tests"),
    "bench": "; ".join([f"{name} {speed} images/s" for name, speed in speeds]
                       + re.findall(r"^\s*(\d+ GFLOP/s = \d+% of the \S+ convolution limit.*)$", text("bench"), re.M)
                       + [last_match(r"^(speed-up.*)$", "bench"), last_match(r"^device=(.*)$", "bench")]),
    "compile": "; ".join(re.findall(r"^\s*torch\.compile: +(.*)$", text("compile"), re.M)
                         + re.findall(r"^\s*(pays for itself .*|never pays.*)$", text("compile"), re.M)),
    "profile": top_operators(text("profile")),
}
lines = [f"# nero-deap GPU check ({mode})", "",
         f"- date: {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC; {(work / 'device.txt').read_text().strip()}",
         "",
         "| step | exit | seconds | result |", "|---|---|---|---|"]
gens = pd.read_csv(run / "gens.csv") if (run / "gens.csv").exists() else None
inds = pd.read_csv(run / "individuals.csv") if (run / "individuals.csv").exists() else None
final = pd.read_csv(run / "final.csv") if (run / "final.csv").exists() else None
if gens is not None:
    resent = int(gens["resent"].fillna(0).sum()) if "resent" in gens else "n/a"
    results["search"] = (f"{len(inds)} evaluations, {int((inds.status != 'ok').sum())} failed "
                         f"({', '.join(sorted(set(inds.status)))}), resent {resent}, "
                         f"best clean {inds.clean_acc.max():.3f}, best FGSM {inds.fgsm_acc.max():.3f}")
if final is not None and len(final):
    r = final.iloc[-1]
    results["final"] = (f"arch {r.arch}: {len(final)} row(s); last ({r['mode']}): clean {r.clean:.3f}, "
                        f"FGSM {r.fgsm:.3f}, PGD-20 {r.pgd:.3f}, AutoAttack {r.autoattack:.3f} on {int(r.aa_n)}, "
                        f"masking {bool(r.masking)}")
for name, rc, seconds in steps:
    lines.append(f"| {name} | {rc} | {seconds} | {results.get(name, '')} |")
if gens is not None:
    cols = [c for c in ("gen", "nevals", "clean_max", "fgsm_max", "hypervolume", "failed", "resent", "wall_s",
                        "evals_per_h")
            if c in gens]
    lines += ["", "Search, per generation (gens.csv):", "", table(gens[cols])]
if final is not None and len(final):
    cols = ["arch", "mode", "source", "epochs", "n_test", "clean", "fgsm", "pgd", "autoattack", "aa_n", "masking",
            "train_s"]
    lines += ["", "Final stage (final.csv):", "", table(final[cols])]
# --throughput: evaluations per hour of each run (gens.csv's evaluations over its wall clock)
for name in ["same4", *sorted(p.name for p in work.glob("search-w*"))]:
    if not ((work / name / "gens.csv").exists() and (work / name / "individuals.csv").exists()):
        continue
    g, ind = pd.read_csv(work / name / "gens.csv"), pd.read_csv(work / name / "individuals.csv")
    lines += ["", f"{name}: {g.nevals.sum()} evaluations in {g.wall_s.sum():.1f} s of wall clock, "
              f"{g.nevals.sum() / g.wall_s.sum() * 3600:.0f} evaluations per hour; per generation "
              + ", ".join(f"{w:.1f} s" for w in g.wall_s)
              + f"; best clean {ind.clean_acc.max():.3f}, best FGSM {ind.fgsm_acc.max():.3f}"]
    if name == "same4":  # the 4 architectures of BENCHMARKS.md's CPU row (train seconds there)
        lines += ["", table(ind[["id", "params", "train_s", "clean_acc", "fgsm_acc", "status"]])]
lines += ["", "Logs: gpu_check.log; CSVs and report.md beside this file."]
summary = "\n".join(lines) + "\n"
(out / "summary.md").write_text(summary)
EOF
summarize() {
    local f
    for f in gens.csv individuals.csv final.csv report.md; do
        [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUTDIR/"
    done
    "$PY" "$WORK/summary.py" "$MODE" "$WORK" "$RUN" "$OUTDIR" >>"$LOG" 2>&1
}

if [ $MODE = full ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: use --dry-run')" || exit 2
    ZIP=.data/cifar10-jpeg.zip
    [ -f $ZIP ] || { echo "no $ZIP: run bench/prepare_gpu_check.sh and carry .data" >&2; exit 2; }
    TESTS=(-m pytest -q -p no:cacheprovider tests/test_device_paths.py tests/test_gpu_ready.py)
    BENCH=(bench/bench_engine.py --data $ZIP --epochs 2)
    COMPILE=(bench/bench_engine.py --data $ZIP --epochs 1 --train-subset 20480 --test-n 1000 --skip-baseline
             --skip-limit --compile)
    PROFILE=(bench/bench_engine.py --data $ZIP --epochs 1 --train-subset 2048 --test-n 500 --skip-baseline
             --skip-limit --profile --interleave 2)
    SEARCH=(-m scoop -n 2 run.py --grammar grammars/cnn.grammar --data $ZIP --population 8 --generations 2
            --epochs 1 --max-seconds 6 --device cuda --workers-per-gpu 2 --out "$RUN")
    FINAL=(run.py final "$RUN" --select fgsm --top 1 --epochs 2 --test-n 500 --aa-n 500 --sweep-n 500 --device cuda)
    # tests bench search final compile profile: 530 s, inside a 590 s call (on one H200, 2026-11-27, the
    # first five took 40, 39, 53, 76 and 36 s)
    LIMITS=(90 80 120 100 80 60)
else
    TESTS=(-m pytest -q -p no:cacheprovider tests/test_device_paths.py tests/test_gpu_ready.py
           -k "acceleration_defaults or claimed_gpu or spreads or tf32")
    BENCH=(bench/bench_engine.py --data synthetic:300 --epochs 1 --test-n 100 --device cpu)
    COMPILE=(bench/bench_engine.py --data synthetic:300 --epochs 1 --test-n 100 --device cpu --skip-baseline
             --skip-limit --compile)
    PROFILE=(bench/bench_engine.py --data synthetic:300 --epochs 2 --test-n 100 --device cpu --skip-baseline
             --skip-limit --profile --interleave 2)
    SEARCH=(-m scoop -n 2 run.py --grammar tests/tiny.grammar --data synthetic:200 --population 4
            --generations 1 --epochs 0.5 --threads 1 --device cpu --out "$RUN")
    FINAL=(run.py final "$RUN" --select fgsm --top 1 --epochs 0.5 --train-subset 100 --test-n 40 --aa-n 20
           --sweep-n 20 --device cpu --threads 1)
    LIMITS=(300 300 300 300 300 300)
fi

if [ $STEPSET = throughput ]; then
    # the README's default fidelity: every training and scoring option left at its default
    if [ $MODE = full ]; then
        DATA=(--grammar grammars/cnn.grammar --data $ZIP --device cuda)
        WORKERS=(4 8) SIZE=(--population 16 --generations 1) TLIMITS=(120 150)
    else
        DATA=(--grammar tests/tiny.grammar --data synthetic:200 --epochs 0.5 --device cpu --threads 1)
        WORKERS=(1 2) SIZE=(--population 4 --generations 1) TLIMITS=(300 300)
    fi
    step same4 "${TLIMITS[0]}" "$PY" run.py "${DATA[@]}" --population 4 --generations 0 --save-weights none \
        --out "$WORK/same4"
    for n in "${WORKERS[@]}"; do
        step "search-w$n" "${TLIMITS[1]}" "$PY" -m scoop -n "$n" run.py "${DATA[@]}" --workers-per-gpu "$n" \
            "${SIZE[@]}" --save-weights none --out "$WORK/search-w$n"
        unfinished "search-w$n" "$WORK/search-w$n" 1
    done
    # the device tool brings back at most 8 files: the log, the summary and each run's individuals.csv
    for run in same4 "${WORKERS[@]/#/search-w}"; do
        cp "$WORK/$run/individuals.csv" "$OUTDIR/$run-individuals.csv" 2>/dev/null
    done
else
    step tests "${LIMITS[0]}" "$PY" "${TESTS[@]}"
    step bench "${LIMITS[1]}" "$PY" "${BENCH[@]}"
    step compile "${LIMITS[4]}" "$PY" "${COMPILE[@]}"
    step profile "${LIMITS[5]}" "$PY" "${PROFILE[@]}"
    step search "${LIMITS[2]}" "$PY" "${SEARCH[@]}"
    unfinished search "$RUN" "$([ $MODE = full ] && echo 2 || echo 1)"
    summarize  # again: the line above may have marked the search failed
    if [ -f "$RUN/pareto.csv" ]; then
        step final "${LIMITS[3]}" "$PY" "${FINAL[@]}"
    else
        printf 'final\tskipped (no search)\t0\n' >>"$STEPS"
    fi
fi
summarize
cat "$OUTDIR/summary.md"
failed=$(awk -F'\t' '$2 != "0"' "$STEPS" | wc -l)
echo "gpu_check ($STEPSET): $failed step(s) failed; summary in $OUTDIR/summary.md"
[ "$failed" -eq 0 ]
