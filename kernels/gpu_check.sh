#!/usr/bin/env bash
# One prepared GPU check of the kernels: every kernel test compiled (not interpreted), then the
# benchmark table (Triton vs the naive torch baseline vs a device copy of the same bytes, and a
# chunk's GPU<->pinned-CPU transfer vs a large pinned copy). Installs nothing; < 5 minutes.
#
#     bash kernels/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# Needs python with torch (CUDA), triton, numpy and pytest (pytest-xdist is used when present).
# The repository need not be installed: a throwaway overlay in a temp dir maps
# `lmcache_lab.kernels` -> kernels/ and `lmcache_lab.experiments.bench_kernels` the same way
# pyproject does, without importing the rest of the package (whose dependencies a bare GPU
# machine may lack). If pytest is missing there, put it in .gpu_pydeps/ beforehand
# (`pip install --target .gpu_pydeps pytest` where there is a network); it is added to PYTHONPATH.
# Results: stdout, and $OUT/bench_kernels.json + $OUT/gpu_check.log when $OUT is set.
# GPU_CHECK_DRY_RUN=1 runs the same steps on a CPU (interpreter, tiny benchmark) to test the script.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
OUTDIR="${OUT:-$(mktemp -d)}"
LOG="$OUTDIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import os, torch, triton
assert torch.cuda.is_available() or os.environ.get("GPU_CHECK_DRY_RUN") == "1", \
    "no CUDA device: this check is for a GPU machine"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
print(f"torch {torch.__version__}, triton {triton.__version__}, {name}")
EOF

OVERLAY="$(mktemp -d)"
trap 'rm -rf "$OVERLAY"' EXIT
mkdir -p "$OVERLAY/lmcache_lab/experiments"
touch "$OVERLAY/lmcache_lab/__init__.py" "$OVERLAY/lmcache_lab/experiments/__init__.py"
ln -s "$REPO/kernels" "$OVERLAY/lmcache_lab/kernels"
ln -s "$REPO/experiments/bench_kernels.py" "$OVERLAY/lmcache_lab/experiments/bench_kernels.py"
ln -s "$REPO/lmcache_lab/codecs.py" "$OVERLAY/lmcache_lab/codecs.py"
ln -s "$REPO/lmcache_lab/wire.py" "$OVERLAY/lmcache_lab/wire.py"
export PYTHONPATH="$OVERLAY:$REPO/.gpu_pydeps"
unset TRITON_INTERPRET                  # compiled on a GPU (the root conftest decides)
cd "$OVERLAY"                           # so the repo's own lmcache_lab/ does not shadow the overlay

"$PY" -c "import pytest" || { echo "pytest is not importable (see the header of this script)"; exit 2; }
TESTS=("$REPO/tests/kernels")
if "$PY" -c "import xxhash" 2>/dev/null; then
    TESTS+=("$REPO/tests/test_codecs.py")
else
    echo "note: xxhash missing, tests/test_codecs.py (wire round trip) skipped"
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi

echo "== kernel tests (compiled Triton) =="
start=$SECONDS
timeout 210 "$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" "${XDIST[@]}" "${TESTS[@]}"
echo "tests: $((SECONDS - start)) s"

echo "== benchmark =="
start=$SECONDS
QUICK=(); if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then QUICK=(--quick); fi
timeout 75 "$PY" -m lmcache_lab.experiments.bench_kernels "${QUICK[@]}" --json "$OUTDIR/bench_kernels.json"
echo "benchmark: $((SECONDS - start)) s; results in $OUTDIR"
