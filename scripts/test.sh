#!/usr/bin/env bash
# Run the test suite (MLX's CPU backend computes with OpenBLAS where Debian's is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
lib=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
exec python3 -m pytest -q --durations=15 "$@"
