#!/usr/bin/env bash
# Create .venv, install edgectl with its test extra, and fetch the default model.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "edgectl setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import edgectl, executorch, torchao, transformers" 2>/dev/null; then
  echo "edgectl setup: installing (about a minute)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is pinned: an open range would pull GBs of CUDA packages.
  .venv/bin/python -m pip install -q -e ".[test]"
fi
.venv/bin/python scripts/fetch_models.py >/dev/null
