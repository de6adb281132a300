#!/usr/bin/env bash
# The two entry points of the project, each installing what it needs first.
#   bash run.sh main   -> the main job: the quick CURVES comparison of six optimizers
#   bash run.sh test   -> the test suite
# Extra arguments are passed on (to the experiment runner, or to pytest).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

ensure_installed() {
  # Keep a torch that is already installed (e.g. a user's CUDA build). Only when there is none,
  # install the pinned CPU-compatible release: a bare "pip install torch" would pull several GB
  # of CUDA wheels on a CPU-only machine.
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
  if ! "$PY" -c "import curvature, optimizers, convergence, hypothesis, pytest_benchmark, matplotlib, tqdm" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet -e ".[test]"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  main)
    ensure_installed
    exec "$PY" -m benchmarks.autoencoder --preset quick --out results/quick "$@"
    ;;
  test)
    ensure_installed
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh {main|test} [args...]" >&2
    exit 2
    ;;
esac
