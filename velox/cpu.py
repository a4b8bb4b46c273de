"""MLX's CPU backend: OpenBLAS for the CLIs and float32 compute.

MLX's Linux CPU wheel links a slow reference BLAS: a 1024×576×1536 fp32 matmul takes
~330 ms with it and ~28 ms with OpenBLAS preloaded, which turns a minutes-long
conversion into seconds. The
library must be preloaded before the process starts, so the CLI re-executes itself.
Set VELOX_NO_OPENBLAS=1 to opt out.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def reexec_with_openblas() -> None:
    """Re-execute the current command with OpenBLAS preloaded, when that helps and is possible."""
    if (not sys.platform.startswith("linux") or os.environ.get("VELOX_NO_OPENBLAS")
            or "openblas" in os.environ.get("LD_PRELOAD", "") or not os.path.exists(OPENBLAS)):
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [OPENBLAS, os.environ.get("LD_PRELOAD")])))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def float32_on_cpu(model) -> None:
    """Compute in float32 on MLX's CPU backend: bf16 matmuls there are slow and lossy
    (SmolLM2-135M answers the capital of France wrongly in bf16, rightly in float32)."""
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
