"""The fused decode kernels (``source``) compiled with ``mx.fast.metal_kernel`` on Apple silicon.

The same bodies as ``cuda`` under the Metal prelude. A threadgroup gets 32 KiB of threadgroup
memory in all, so a partial block holds at most 2048 scores: with the per-coordinate level
tables (16.1 KiB at head_dim 128) that stays under 25 KiB. target_blocks (not measured on a
Mac yet): ~4 threadgroups per GPU core for the larger M-series GPUs (up to 40 cores).
"""

from __future__ import annotations

from .fused import FusedDecode, supports

__all__ = ["coded_partial", "decode", "supports", "tokens_per_block"]

_fused = FusedDecode("metal", ps_budget=2048, target_blocks=160)
coded_partial = _fused.coded_partial
decode = _fused.decode
tokens_per_block = _fused.tokens_per_block
