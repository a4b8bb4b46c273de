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
from .scalar import PackLayout, gaussian_distortion, level_codes, lloyd_max, pack, per_codec, sphere_levels, unpack

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
        self.bits = tuple(int(math.log2(lv.shape[0])) for lv in (self.levels1, self.levels2))  # per stage
        b1, b2 = self.bits
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
        return (stage_levels(self, words) @ self.rotation.T) * (norms.astype(mx.float32) / math.sqrt(D))[..., None]


def stage_levels(codec: RVQCodec, words: mx.array) -> mx.array:
    """words [B, H, N, W] -> levels1[c1] + levels2[c2] [B, H, N, D] float32: the coded
    directions in the rotated basis, times √D."""
    D = codec.rotation.shape[0]
    table = per_codec(codec, "paired_table", _codec_paired_table)
    if table is None:
        codes = unpack(words, codec.layout)
        return codec.levels1[codes[..., :D]] + codec.levels2[codes[..., D:]]
    # Byte i of stage 1 and byte i of stage 2 code the same coordinates: one gather per pair.
    n = D * codec.bits[0] // 8  # bytes per stage
    u = words.view(mx.uint8).astype(mx.uint16)
    return mx.take(table, u[..., :n] | (u[..., n:2 * n] << 8), axis=0).reshape(*words.shape[:-1], D)


def _codec_paired_table(codec: RVQCodec) -> mx.array | None:
    b1, b2 = codec.bits
    if b1 != b2 or b1 not in (1, 2, 4) or codec.rotation.shape[0] * b1 % 8:
        return None
    return paired_table(tuple(np.array(codec.levels1).tolist()), tuple(np.array(codec.levels2).tolist()), b1)


@lru_cache(maxsize=None)
def paired_table(levels1: tuple[float, ...], levels2: tuple[float, ...], bits: int) -> mx.array:
    """[2^16, 8/b]: levels1[c1] + levels2[c2] for the b-bit codes of a stage-1 byte (low 8 bits)
    and the stage-2 byte coding the same coordinates (high 8 bits). Replaces the unpack and two
    gathers per coordinate, the CPU backend's slowest ops; one table serves every layer."""
    l1, l2 = np.array(levels1, np.float32), np.array(levels2, np.float32)
    index = np.arange(1 << 16)
    mask = (1 << bits) - 1
    return mx.array(np.stack([l1[(index >> (bits * j)) & mask] + l2[(index >> (8 + bits * j)) & mask]
                              for j in range(8 // bits)], axis=-1))


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


# ---------------------------------------------------------------- attention from the codes
# x̂ = norm/√D · (levels1[c1] + levels2[c2]) @ Rᵀ with one R for every head, so
# q · x̂ = norm · ((q @ R)/√D) · stage_levels: the query is rotated once; values are
# summed in the rotated basis and un-rotated once.


def query_basis(codec: RVQCodec, q: mx.array, offset: int = 0) -> mx.array:
    """q [B, H, n, D] float32 -> (q @ R)/√D [B, H, n, D]."""
    return (q @ codec.rotation) * codec.rotation.shape[0] ** -0.5


def key_scores(codec: RVQCodec, q_rot: mx.array, parts: tuple[mx.array, mx.array], a: int, b: int) -> mx.array:
    """q · x̂ for the coded tokens [a, b) of parts (words, norms) -> [B, H, n, b − a] float32."""
    words, norms = parts
    y = stage_levels(codec, words[:, :, a:b])
    return (q_rot @ y.swapaxes(-1, -2)) * norms[:, :, None, a:b].astype(mx.float32)


def value_sum(codec: RVQCodec, p: mx.array, parts: tuple[mx.array, mx.array], a: int, b: int) -> mx.array:
    """p [B, H, n, b − a] -> Σ p · norm · stage_levels [B, H, n, D] over tokens [a, b) (rotated basis,
    times √D)."""
    words, norms = parts
    return (p * norms[:, :, None, a:b].astype(mx.float32)) @ stage_levels(codec, words[:, :, a:b])


def value_output(codec: RVQCodec, acc: mx.array, mass: mx.array) -> mx.array:
    """Summed ``value_sum`` acc [B, H, n, D] -> Σ p · x̂ [B, H, n, D] (no mean: mass unused)."""
    return (acc @ codec.rotation.T) * codec.rotation.shape[0] ** -0.5
