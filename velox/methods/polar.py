"""polar: PolarQuant (arXiv 2502.02617): random preconditioning, then a recursive polar
transform whose angles are quantized with codebooks of their known distributions.

After a seeded randomized Hadamard rotation y = x·R, level 1 turns each pair
(y_2i, y_2i+1) into a radius and an angle in [0, 2π), which is uniform; level ℓ ≥ 2
turns each pair of radii from level ℓ−1 into a radius and an angle in [0, π/2] with
density ∝ sin^(2^(ℓ−1)−1)(2ψ) (the direction of a rotated vector is uniform on the
sphere), down to one radius: ‖x‖, kept in fp16. So no calibration: level 1 uses a
uniform quantizer on the circle, the others Lloyd-Max codebooks of their densities.

Bits per level: an angle error δ at a level-ℓ node moves the vector by r·δ with
E r² = 2^ℓ/D·‖x‖², and level ℓ has D/2^ℓ nodes, so its share of the error is that
level's angle MSE. The B·D bit budget is spread by greedy reverse water-filling:
each step adds one bit to every angle of the level with the largest error drop per
bit spent (paper: 4 bits at level 1, 2 above; here the same rule decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .base import LayerSpec, no_calibration
from .rotation import randomized_hadamard, seeded_codecs
from .scalar import MAX_BITS, PackLayout, level_codes, lloyd_max, pack, unpack

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = SUPPORTED_VALUE_BITS = (2, 3, 4, 5, 6)
TWO_PI = 2.0 * math.pi


@lru_cache(maxsize=None)
def angle_levels(level: int, bits: int) -> tuple[tuple[float, ...], float]:
    """(sorted levels, mean squared error) of the angle quantizer of ``level`` at ``bits``."""
    if level == 1:  # uniform on the circle: the uniform quantizer is optimal
        k = 1 << bits
        return tuple(((np.arange(k) + 0.5) * TWO_PI / k).tolist()), (TWO_PI / k) ** 2 / 12
    grid = np.linspace(0.0, math.pi / 2, 100_001)
    weight = np.sin(2 * grid) ** (2 ** (level - 1) - 1)
    if bits == 0:
        mean = float((grid * weight).sum() / weight.sum())
        levels = np.array([mean])
    else:
        levels = lloyd_max(grid, weight, bits)
    err = np.min((grid[:, None] - levels[None]) ** 2, axis=1)
    return tuple(levels.tolist()), float((err * weight).sum() / weight.sum())


def allocate_level_bits(head_dim: int, bits: int) -> list[int]:
    """Bits per angle for levels 1..log2(D), using at most bits·D bits in all."""
    n_levels = int(math.log2(head_dim))
    alloc = [0] * n_levels
    alloc[0] = 1  # level 1 needs a bit to tell half-planes apart (it has no 0-bit codebook)
    budget = bits * head_dim - head_dim // 2
    while True:
        best, best_gain = None, 0.0
        for i in range(n_levels):
            cost = head_dim >> (i + 1)
            if alloc[i] < MAX_BITS and cost <= budget:
                gain = (angle_levels(i + 1, alloc[i])[1] - angle_levels(i + 1, alloc[i] + 1)[1]) / cost
                if gain > best_gain:
                    best, best_gain = i, gain
        if best is None:
            return alloc
        alloc[best] += 1
        budget -= head_dim >> (best + 1)


@dataclass
class PolarCodec:
    """rotation [D, D]; level_bits: bits per angle at each level 1..log2(D)."""

    rotation: mx.array
    level_bits: tuple[int, ...]

    def __post_init__(self):
        D = self.rotation.shape[0]
        self.levels = [mx.array(np.array(angle_levels(i + 1, b)[0], np.float32))
                       for i, b in enumerate(self.level_bits)]
        self.layout = PackLayout.from_bits(np.concatenate(
            [np.full(D >> (i + 1), b) for i, b in enumerate(self.level_bits)])[None])

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
        """x [B, H, L, D] -> (angle code words [B, H, L, W] uint32, norms [B, H, L] fp16)."""
        r = x.astype(mx.float32) @ self.rotation
        codes = []
        for i, levels in enumerate(self.levels):
            pairs = r.reshape(*r.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            angle = mx.arctan2(b, a)
            if i == 0:  # [0, 2π), uniform cells: the code is the cell index, wrapping around
                k = levels.shape[0]
                codes.append(mx.floor(mx.remainder(angle, TWO_PI) * (k / TWO_PI)).astype(mx.uint32) % k)
            else:
                codes.append(level_codes(angle, levels))
            r = mx.sqrt(a * a + b * b)
        return pack(mx.concatenate(codes, axis=-1), self.layout), r[..., 0].astype(mx.float16)

    def decode(self, words: mx.array, norms: mx.array, offset: int = 0) -> mx.array:
        """-> x̂ [B, H, L, D] float32."""
        codes = unpack(words, self.layout)
        D = self.rotation.shape[0]
        starts = np.cumsum([0] + [D >> (i + 1) for i in range(len(self.levels))])
        r = norms.astype(mx.float32)[..., None]
        for i in reversed(range(len(self.levels))):
            angle = self.levels[i][codes[..., int(starts[i]):int(starts[i + 1])]]
            r = mx.stack([r * mx.cos(angle), r * mx.sin(angle)], axis=-1).reshape(*r.shape[:-1], -1)
        return r @ self.rotation.T


def make_codec(head_dim: int, bits: int, seed: int) -> PolarCodec:
    """Codec for [B, H, L, head_dim] tensors (head_dim a power of two) at ``bits`` per element."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"polar needs a power-of-two head_dim, got {head_dim}")
    return PolarCodec(randomized_hadamard(head_dim, seed), tuple(allocate_level_bits(head_dim, bits)))


calibrate = no_calibration


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[PolarCodec, PolarCodec]:
    """(key codec, value codec) for one layer."""
    return seeded_codecs(spec, make_codec)
