"""turboquant_rvq: two-stage residual scalar quantization after a random rotation.

Like turboquant_mse, a vector keeps its norm (fp16) and its direction is rotated by a
seeded randomized Hadamard transform, so each coordinate (scaled by √D) is close to
N(0, 1). Stage 1 rounds it to the Lloyd-Max levels of that distribution
(``scalar.sphere_levels``); stage 2 rounds the stage-1 error to the Lloyd-Max levels of
a Laplace distribution with the error's standard deviation. ``bits`` B per element is
split ⌈B/2⌉ + ⌊B/2⌋ over the two stages (b bits per stage for even B). Data-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .base import LayerSpec, no_calibration
from .rotation import randomized_hadamard, seeded_codecs
from .scalar import PackLayout, gaussian_distortion, level_codes, lloyd_max, pack, sphere_levels, unpack

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = SUPPORTED_VALUE_BITS = (2, 3, 4, 5, 6)


@lru_cache(maxsize=None)
def laplace_levels(bits: int) -> tuple[float, ...]:
    """Lloyd-Max levels of the unit-variance Laplace distribution (density ∝ e^(−√2|t|))."""
    grid = np.linspace(-15.0, 15.0, 300_001)
    return tuple(lloyd_max(grid, np.exp(-math.sqrt(2.0) * np.abs(grid)), bits).tolist())


def stage_bits(bits: int) -> tuple[int, int]:
    """Total bits per element -> (stage 1 bits, stage 2 bits)."""
    return (bits + 1) // 2, bits // 2


@dataclass
class RVQCodec:
    """rotation [D, D]; stage levels [K1] and [K2] in units of a √D-scaled coordinate."""

    rotation: mx.array
    levels1: mx.array
    levels2: mx.array

    def __post_init__(self):
        D = self.rotation.shape[0]
        b1, b2 = (int(math.log2(lv.shape[0])) for lv in (self.levels1, self.levels2))
        self.layout = PackLayout.from_bits(np.array([[b1] * D + [b2] * D]))

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
        """x [B, H, L, D] -> (words [B, H, L, W] uint32, norms [B, H, L] fp16)."""
        x = x.astype(mx.float32)
        D = x.shape[-1]
        norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
        y = (x / mx.maximum(norm, 1e-20)) @ self.rotation * math.sqrt(D)
        c1 = level_codes(y, self.levels1)
        c2 = level_codes(y - self.levels1[c1], self.levels2)
        return pack(mx.concatenate([c1, c2], axis=-1), self.layout), norm[..., 0].astype(mx.float16)

    def decode(self, words: mx.array, norms: mx.array, offset: int = 0) -> mx.array:
        """-> x̂ [B, H, L, D] float32."""
        D = self.rotation.shape[0]
        codes = unpack(words, self.layout)
        y = self.levels1[codes[..., :D]] + self.levels2[codes[..., D:]]
        return (y @ self.rotation.T) * (norms.astype(mx.float32) / math.sqrt(D))[..., None]


def make_codec(head_dim: int, bits: int, seed: int) -> RVQCodec:
    """Codec for [B, H, L, head_dim] tensors at ``bits`` bits per element over two stages."""
    b1, b2 = stage_bits(bits)
    sigma = math.sqrt(gaussian_distortion(b1))  # std of the stage-1 error
    return RVQCodec(rotation=randomized_hadamard(head_dim, seed),
                    levels1=mx.array(np.array(sphere_levels(b1, head_dim), np.float32)),
                    levels2=mx.array((sigma * np.array(laplace_levels(b2))).astype(np.float32)))


calibrate = no_calibration


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[RVQCodec, RVQCodec]:
    """(key codec, value codec) for one layer."""
    return seeded_codecs(spec, make_codec)
