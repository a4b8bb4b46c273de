"""turboquant_mse: data-free rotated scalar quantization (TurboQuant, arXiv 2504.19874).

Each key/value vector keeps its norm (fp16); its direction is rotated by a
randomized Hadamard transform, after which every coordinate follows the same known
distribution, so one Lloyd-Max codebook (``scalar.sphere_levels``) serves them all.
Nothing is calibrated: the rotation is rebuilt from the stored seed.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import LayerSpec, no_calibration
from .rotation import randomized_hadamard, seeded_codecs
from .scalar import ScalarCodec, sphere_levels

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = SUPPORTED_VALUE_BITS = (1, 2, 3, 4, 5, 6, 8)


def make_codec(num_heads: int, head_dim: int, bits: int, seed: int) -> ScalarCodec:
    """Codec for [B, num_heads, L, head_dim] tensors at ``bits`` bits per element."""
    rot = randomized_hadamard(head_dim, seed)
    # Levels rounded to fp16 (error < 5e-4 of a level, far below the quantization step): the
    # GPU kernel's tensor cores then take them exactly, one fp16 operand per code.
    levels = mx.array(np.array(sphere_levels(bits, head_dim), dtype=np.float16).astype(np.float32))
    H, D, K = num_heads, head_dim, 1 << bits
    return ScalarCodec(
        rotation=mx.broadcast_to(rot, (H, D, D)),
        scale=mx.full((H, D), 1.0 / np.sqrt(D), dtype=mx.float32),
        levels=mx.broadcast_to(levels, (H, D, K)),
        bits=np.full((H, D), bits),
    )


calibrate = no_calibration


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[ScalarCodec, ScalarCodec]:
    """(key codec, value codec) for one layer; K and V get different rotations."""
    return seeded_codecs(spec, lambda dim, bits, seed: make_codec(spec.num_kv_heads, dim, bits, seed))
