"""The fused decode kernels (``source``) compiled with ``mx.fast.cuda_kernel`` for MLX's CUDA backend.

Sizes for an H100: 48 KiB of static shared memory per block holds 4096 scores next to the
per-coordinate level tables, and ~4 partial blocks per SM (132 SMs) fill the GPU.
"""

from __future__ import annotations

from .fused import FusedDecode, supports

__all__ = ["coded_partial", "decode", "supports", "tokens_per_block"]

_fused = FusedDecode("cuda", ps_budget=4096, target_blocks=528)
coded_partial = _fused.coded_partial
decode = _fused.decode
tokens_per_block = _fused.tokens_per_block
