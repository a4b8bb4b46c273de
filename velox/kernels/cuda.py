"""The fused decode kernel (``source``) compiled with ``mx.fast.cuda_kernel`` for MLX's CUDA backend.

Sizes for an H100/H200: 48 KiB of static shared memory per block (``smem_words``) holds 4096
scores next to the level tables (a 4-bit pair table takes 8192 words: T = 1024 at 4 query heads
per KV head still fits); with the tensor-core passes a thread uses ~113 registers (NVRTC, sm_90,
4/4 bits), so four 128-thread blocks fit an SM and ~264 blocks (two per SM of 132) or
more give one full wave at long contexts (T = 1024 tokens per block at 64k, 8 KV heads: 512
blocks). Measured on an H200 (CUDA-core passes) against 132 and 528: 264 and 132 tied, 528
(more, shorter blocks) was 20–30% slower; with the tensor-core passes 132 tied at 1k, 8k and
64k and was 23% slower at 32k.
"""

from __future__ import annotations

from .fused import FusedDecode, supports

__all__ = ["append", "coded_partial", "decode", "supports", "tokens_per_block"]

_fused = FusedDecode("cuda", ps_budget=4096, target_blocks=264, smem_words=12288)
append = _fused.append
coded_partial = _fused.coded_partial
decode = _fused.decode
tokens_per_block = _fused.tokens_per_block
