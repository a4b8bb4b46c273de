"""turboquant_prod: unbiased inner products at b bits (TurboQuant, arXiv 2504.19874, Alg. 2).

A key is coded with (b−1)-bit turboquant_mse, and the residual r = k − k̂_mse with a
1-bit QJL sketch (m = D Gaussian projections) plus ‖r‖ in fp16. The decoded key
k̂_mse + QJL(r) gives E[q·k̂] = q·k for every q (tested statistically). Values use
turboquant_mse at the value bits: attention averages values, so their mean squared
error is what matters and the QJL stage would only add variance there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import qjl, scalar, turboquant_mse
from .base import LayerSpec, no_calibration
from .qjl import QJLCodec, sketch_matrix
from .rotation import KEY_ROTATION, KEY_SKETCH, layer_seed
from .scalar import ScalarCodec

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = (2, 3, 4, 5, 6)
SUPPORTED_VALUE_BITS = turboquant_mse.SUPPORTED_VALUE_BITS


@dataclass
class ProdCodec:
    """(b−1)-bit MSE codec + QJL sketch of its residual."""

    mse: ScalarCodec
    qjl: QJLCodec

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, ...]:
        """x [B, H, L, D] -> (mse words, norms, residual sign words, residual norms)."""
        x = x.astype(mx.float32)
        parts = self.mse.encode(x)
        return parts + self.qjl.encode(x - self.mse.decode(*parts))

    def decode(self, words, norms, r_words, r_norms, offset: int = 0) -> mx.array:
        """-> k̂ [B, H, L, D], unbiased for inner products."""
        return self.mse.decode(words, norms) + self.qjl.decode(r_words, r_norms)


def query_basis(codec: ProdCodec, q: mx.array, offset: int = 0) -> tuple[Any, mx.array]:
    """q [B, H, n, D] float32 -> (its basis for the MSE codes, for the residual's sketch): q · k̂ is
    the MSE part's score plus the QJL estimator term (attention from the codes, velox.kernels.reference)."""
    return scalar.query_basis(codec.mse, q, offset), qjl.query_basis(codec.qjl, q, offset)


def key_scores(codec: ProdCodec, q_basis: tuple[Any, mx.array], parts: tuple[mx.array, ...],
               a: int, b: int) -> mx.array:
    """q · k̂ for the coded tokens [a, b) of parts (words, norms, residual sign words, residual
    norms) -> [B, H, n, b − a] float32."""
    return (scalar.key_scores(codec.mse, q_basis[0], parts[:2], a, b)
            + qjl.key_scores(codec.qjl, q_basis[1], parts[2:], a, b))


calibrate = no_calibration


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[ProdCodec, ScalarCodec]:
    """(key codec at key_bits = (key_bits−1) MSE + 1 QJL, turboquant_mse value codec)."""
    H, D = spec.num_kv_heads, spec.head_dim
    keys = ProdCodec(turboquant_mse.make_codec(H, D, spec.key_bits - 1, layer_seed(spec.seed, spec.layer, KEY_ROTATION)),
                     QJLCodec(sketch_matrix(D, D, layer_seed(spec.seed, spec.layer, KEY_SKETCH))))
    return keys, turboquant_mse.make_codecs({}, spec)[1]
