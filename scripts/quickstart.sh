#!/usr/bin/env bash
# The main job end to end: install, build the real SmolLM2 test model, convert, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=$(python3 scripts/fetch_test_model.py)
velox-convert --hf-path "$model" --mlx-path out/smollm2-kv --kv spectral,turboquant_mse --force
velox-generate --model out/smollm2-kv --prompt "What is the capital of France?" --max-tokens 40
