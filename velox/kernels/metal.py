"""The fused decode kernel (``source``) compiled with ``mx.fast.metal_kernel`` on Apple silicon.

The same body as ``cuda`` under the Metal prelude. A threadgroup gets 32 KiB of threadgroup
memory in all, so a block holds at most 2048 scores: with the per-coordinate level tables
(16.1 KiB at head_dim 128) that stays under 25 KiB. target_blocks (not measured on a Mac yet):
~4 threadgroups per GPU core for the larger M-series GPUs (up to 40 cores). The last block's
merge needs device-scope fences (``atomic_thread_fence``, Metal 3.2): older macOS runs the
mx reference.
"""

from __future__ import annotations

import platform

from .fused import FusedDecode
from .fused import supports as _supports

__all__ = ["append", "coded_partial", "decode", "supports", "tokens_per_block"]

_fused = FusedDecode("metal", ps_budget=2048, target_blocks=160)
coded_partial = _fused.coded_partial
decode = _fused.decode
tokens_per_block = _fused.tokens_per_block
_METAL_3_2 = int((platform.mac_ver()[0] or "0").split(".")[0]) >= 15  # macOS 15 brings Metal 3.2


def supports(queries, kv, mask) -> bool:
    """``fused.supports`` on macOS 15 or later (Metal 3.2's device-scope fences)."""
    return _METAL_3_2 and _supports(queries, kv, mask)


def append(*args):
    """``FusedDecode.append`` where the decode kernel runs (macOS 15): its launches order the writes."""
    return _fused.append(*args) if _METAL_3_2 else None
