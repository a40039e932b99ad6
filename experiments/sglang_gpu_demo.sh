#!/usr/bin/env bash
# SGLang + lmcache_lab on a GPU machine: launch SGLang's server with lmcache_lab as its HiCache
# storage backend, send a shared-prefix workload twice (SGLang's own GPU and host caches flushed
# before each pass, so the second pass reuses the prefix only through lmcache_lab), and print the
# cached prompt tokens and TTFT of each pass.
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct experiments/sglang_gpu_demo.sh
#   MODEL=/models/llama REDIS_URL=redis://127.0.0.1:6379 experiments/sglang_gpu_demo.sh
#
# Needs: a CUDA GPU, SGLang installed with its dependencies (`pip install "sglang==0.5.23"`), and
# this package (`pip install -e .`). It cannot run on CPU-only machines (docs/sglang.md).
# Env: MODEL (required), REDIS_URL, DISK_PATH, CPU_CAPACITY (8GiB), REQUESTS (8),
#      PREFIX_TOKENS (2048), SUFFIX_TOKENS (64), PAGE_SIZE (64), WORKDIR (outputs/sglang_demo),
#      PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a model directory or hub id SGLang can load}"
PY=${PYTHON:-python}
WORKDIR=${WORKDIR:-outputs/sglang_demo}
mkdir -p "$WORKDIR"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "sglang_gpu_demo: no CUDA GPU visible; SGLang's engine cannot run here (docs/sglang.md)" >&2
  exit 2
fi
"$PY" -c "import sglang, sgl_kernel" 2>/dev/null || {
  echo "sglang_gpu_demo: install SGLang with its dependencies first: pip install 'sglang==0.5.23'" >&2
  exit 2
}

args=(--model "$MODEL" --workdir "$WORKDIR" --out "$WORKDIR/summary.json"
      --cpu-capacity "${CPU_CAPACITY:-8GiB}" --requests "${REQUESTS:-8}"
      --prefix-tokens "${PREFIX_TOKENS:-2048}" --suffix-tokens "${SUFFIX_TOKENS:-64}"
      --page-size "${PAGE_SIZE:-64}")
[ -n "${REDIS_URL:-}" ] && args+=(--redis-url "$REDIS_URL")
[ -n "${DISK_PATH:-}" ] && args+=(--disk-path "$DISK_PATH")

# The driver launches `python -m sglang.launch_server ... --enable-hierarchical-cache
# --hicache-storage-backend dynamic --hicache-storage-backend-extra-config '{"backend_name":
# "lmcache_lab", "module_path": "lmcache_lab.integrations.sglang", "class_name":
# "LMCacheLabStorage", "interface_v1": 1, "tiers": {...}}'` on a free 127.0.0.1 port, and stops it.
"$PY" -m lmcache_lab.experiments.sglang_driver "${args[@]}"
echo "server log: $WORKDIR/sglang_server.log; per-request results: $WORKDIR/summary.json"
