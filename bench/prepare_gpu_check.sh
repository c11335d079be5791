#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, what bench/gpu_check.sh needs on a lent GPU machine (BENCHMARKS.md):
#   .whl/   wheels for Python 3.12 / x86-64 of what the GPU image lacks: deap (+ moocore, cffi, pycparser,
#           platformdirs), scoop (+ pyzmq, greenlet), pyautoattack, tomli-w.  gpu_check.sh installs only
#           those whose module is missing there.
#   .data/  cifar10-jpeg.zip (the path in $NERO_DEAP_CIFAR10_ZIP)
# Both folders are git-ignored; name them in the device tool's `carry`.  Everything that travels must stay
# under 64 MiB: the zip is 59.3 MiB, so pyautoattack's wheel is slimmed (its 45 MB of example models go).
# Usage: bench/prepare_gpu_check.sh           (PYTHON=... picks the pip to use; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ZIP=${NERO_DEAP_CIFAR10_ZIP:?set NERO_DEAP_CIFAR10_ZIP to the CIFAR-10 JPEG zip}
mkdir -p .whl .data
rm -f .whl/*.whl

# the GPU image's python3 is CPython 3.12 (see the device tool's KINDS.md); pins match requirements.txt / the venv
BINARY=(deap==1.4.4 moocore==0.3.2 cffi==2.1.1 pycparser==3.12 platformdirs==4.14.8 pyzmq==27.3.0
        greenlet==3.5.6 pyautoattack==0.2.0 tomli-w==1.2.0)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${BINARY[@]}"
# scoop 0.7.2.0 is published as a source archive only: build its (pure-Python) wheel here
"$PY" -m pip wheel -q --no-deps -w .whl scoop==0.7.2.0

# pyautoattack's wheel carries example models (model_test.pt, tf_model.weight.h5) nobody imports: drop them
"$PY" - <<'EOF'
import glob, os, zipfile

(path,) = glob.glob(".whl/pyautoattack-*.whl")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if "/examples/" in item.filename and item.filename.endswith((".pt", ".h5")):
            continue
        data = src.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n")
                              if not (b"/examples/" in line and (b".pt," in line or b".h5," in line)))
        dst.writestr(item, data)
os.replace(slim, path)
EOF

[ -f .data/cifar10-jpeg.zip ] || cp "$ZIP" .data/cifar10-jpeg.zip
ls -la .whl .data
# what travels: tracked files and untracked ones git does not ignore (the device tool sends both), and the carry
total=$( (du -cb .whl .data | tail -1 | cut -f1
          git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null) |
        awk '{s += $1} END {print s}')
echo "to carry: $((total / 1048576)) MiB of the 64 MiB a device call may carry (working tree included)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB" >&2; exit 1; }
