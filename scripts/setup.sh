#!/usr/bin/env bash
# Create .venv, install edgectl with its test and openvino extras, and fetch the test models.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "edgectl setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import edgectl, executorch, torchao, transformers, openvino, importlib.util as u; assert u.find_spec('nncf')" 2>/dev/null; then
  echo "edgectl setup: installing (about a minute)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is pinned: an open range would pull GBs of CUDA packages.
  # the openvino extra: tests/backends/test_backends.py runs OpenVINO programs (~170 MB, 51 MB download)
  .venv/bin/python -m pip install -q -e ".[test,openvino]"
fi
# the default model and Gemma 3 270M, which the tests use (tests/conftest.py: smol_gguf, gemma_gguf)
.venv/bin/python scripts/fetch_models.py --model smollm2 --model gemma3 >/dev/null
# stories260K (stories_dir), from ../shared only: without it its tests skip and say so, and
# the rest (quickstart.sh) goes on
.venv/bin/python scripts/fetch_models.py --model stories260K >/dev/null \
  || echo "edgectl setup: warning: no stories260K in the edgectl cache; the tests that use it will skip" >&2
