"""qjl: 1-bit Johnson-Lindenstrauss sketches of keys (QJL, arXiv 2406.03482).

A key k is stored as the signs of m = b·D Gaussian projections, sign(k·S) with
S [D, m] i.i.d. N(0, 1) (seeded, rebuilt at load time), plus its norm in fp16.
QJL's asymmetric estimator

    q·k ≈ √(π/2)/m · ‖k‖ · ⟨q·S, sign(k·S)⟩

is unbiased and linear in q, so it equals q·k̂ for k̂ = √(π/2)/m · ‖k‖ · sign(k·S)·Sᵀ:
``decode`` returns that k̂ and attention on it computes exactly the estimator.
Values use turboquant_mse. ``QJLCodec`` is also turboquant_prod's residual sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import turboquant_mse
from .base import LayerSpec, no_calibration
from .rotation import KEY_SKETCH, layer_seed
from .scalar import pack_signs, unpack_signs

DEFAULT_KEY_BITS = 2
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = (1, 2, 3, 4)
SUPPORTED_VALUE_BITS = turboquant_mse.SUPPORTED_VALUE_BITS


def sketch_matrix(dim: int, m: int, seed: int) -> mx.array:
    """S [dim, m] with i.i.d. N(0, 1) entries, from a seed."""
    return mx.array(np.random.default_rng(seed).standard_normal((dim, m)).astype(np.float32))


@dataclass
class QJLCodec:
    """Sketch S [D, m]; codes a vector as (sign words [.., m/32] uint32, norm fp16)."""

    sketch: mx.array

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
        """x [B, H, L, D] -> (words [B, H, L, ceil(m/32)] uint32, norms [B, H, L] fp16)."""
        x = x.astype(mx.float32)
        norm = mx.sqrt(mx.sum(x * x, axis=-1))
        return pack_signs(x @ self.sketch), norm.astype(mx.float16)

    def decode(self, words: mx.array, norms: mx.array, offset: int = 0) -> mx.array:
        """-> k̂ [B, H, L, D] whose inner product with any q is QJL's unbiased estimate of q·k."""
        m = self.sketch.shape[1]
        signs = unpack_signs(words, m)
        return (signs @ self.sketch.T) * (norms.astype(mx.float32) * (math.sqrt(math.pi / 2) / m))[..., None]


def query_basis(codec: QJLCodec, q: mx.array, offset: int = 0) -> mx.array:
    """q [B, H, n, D] float32 -> q·S · √(π/2)/m [B, H, n, m]: then q · k̂ = norm · ⟨it, sign(k·S)⟩,
    QJL's estimator scored from the sign bits (attention from the codes, velox.kernels.reference)."""
    m = codec.sketch.shape[1]
    return (q @ codec.sketch) * (math.sqrt(math.pi / 2) / m)


def key_scores(codec: QJLCodec, q_sketch: mx.array, parts: tuple[mx.array, mx.array], a: int, b: int) -> mx.array:
    """q · k̂ for the coded tokens [a, b) of parts (sign words, norms) -> [B, H, n, b − a] float32."""
    words, norms = parts
    signs = unpack_signs(words[:, :, a:b], codec.sketch.shape[1])
    return (q_sketch @ signs.swapaxes(-1, -2)) * norms[:, :, None, a:b].astype(mx.float32)


calibrate = no_calibration


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[QJLCodec, object]:
    """(key codec with m = key_bits·D projections, turboquant_mse value codec)."""
    D = spec.head_dim
    keys = QJLCodec(sketch_matrix(D, spec.key_bits * D, layer_seed(spec.seed, spec.layer, KEY_SKETCH)))
    return keys, turboquant_mse.make_codecs({}, spec)[1]
