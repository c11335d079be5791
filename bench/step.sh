# Sourced by bench/gpu_check.sh and experiments/headline.sh, the scripts a lent GPU runs under a time budget.
#
# begin_steps LOG_FILE FOLDER [SHOW]: the steps' log (emptied), the folder for their outputs and timings
# (FOLDER/steps.tsv), and how much of each step's output to print when it ends: "all" or a number of last
# lines (default all).
begin_steps() {
    LOG=$1 STEP_OUTPUT=$2 STEPS=$2/steps.tsv STEP_SHOW=${3:-all}
    : >"$LOG"
    : >"$STEPS"
}

# run_step NAME LIMIT_S COMMAND...: run COMMAND under a time limit (killed 5 s after it), append its output to
# $LOG and write it to $STEP_OUTPUT/NAME.out, record "NAME exit-status seconds" in $STEPS, say so when the
# limit stopped it, print its output (STEP_SHOW), and return its exit status.  T0 (the call's start, in
# seconds since the epoch), when set, is reported too.
run_step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s${T0:+, $(( $(date +%s) - T0 ))s into the call}): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$STEP_OUTPUT/$name.out" >>"$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "=== $name: stopped at its ${limit}s limit" | tee -a "$LOG"
    fi
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    if [ "$STEP_SHOW" = all ]; then cat "$STEP_OUTPUT/$name.out"; else tail -n "$STEP_SHOW" "$STEP_OUTPUT/$name.out"; fi
    return "$rc"
}

# install_missing: the packages the GPU image lacks, installed from the wheels bench/prepare_gpu_check.sh puts in
# .whl/ into $WORK/site (added to PYTHONPATH; call it outside a pipeline, so that the export reaches the
# script); then a check that everything nero-deap and its tests import is there.
install_missing() {
    local whl dist mod missing=()
    for whl in .whl/*.whl; do
        [ -f "$whl" ] || continue
        dist=$(basename "$whl" | cut -d- -f1)
        case $dist in pyzmq) mod=zmq ;; *) mod=$dist ;; esac
        "$PY" -c "import $mod" 2>/dev/null || missing+=("$whl")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing what is missing: ${missing[*]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
            "${missing[@]}" || return 1
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "nothing to install"
    fi
    "$PY" -c "import deap, scoop, zmq, greenlet, pyautoattack, tomli_w, tqdm, pandas, matplotlib, PIL, torchvision, torch"
}
