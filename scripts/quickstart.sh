#!/usr/bin/env bash
# The main job end to end on the default model (SmolLM2-135M-Instruct):
# set up, export to an XNNPACK .pte, and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/python scripts/fetch_models.py)
mkdir -p out
.venv/bin/edgectl export "$MODEL" -o out/smollm2-135m.pte --max-seq-len 1024
.venv/bin/edgectl run out/smollm2-135m.pte --chat --prompt "What is the capital of France?" -n 64
