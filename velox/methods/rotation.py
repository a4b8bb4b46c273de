"""Orthogonal rotations shared by the methods."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def randomized_hadamard(dim: int, seed: int) -> mx.array:
    """[D, D] orthogonal matrix R with y = x @ R = H·diag(s)·x / √D (random signs s).

    Built with ``mx.hadamard_transform`` where MLX supports the size (m·2^k, m in
    1, 12, 20, 28); other sizes fall back to a random orthogonal matrix (QR).
    """
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=dim).astype(np.float32)
    if hadamard_supported(dim):
        # Row i of the result is the transform of signs[i]·e_i, i.e. R[i] = s_i·H[i]/√D.
        rot = mx.hadamard_transform(mx.array(np.diag(signs)), scale=dim**-0.5)
        mx.eval(rot)
        return rot
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return mx.array((q * np.sign(np.diag(r))).astype(np.float32))


def hadamard_supported(dim: int) -> bool:
    """Whether ``mx.hadamard_transform`` takes this size: m·2^k with m in 1, 12, 20, 28.

    Checked here because MLX 0.32 does not always refuse the others: size 60 corrupts
    the heap instead of raising."""
    return any(dim % m == 0 and (dim // m) & (dim // m - 1) == 0 for m in (1, 12, 20, 28))


KEY_ROTATION, VALUE_ROTATION, KEY_SKETCH = 0, 1, 2  # the seeded random parts of a layer


def layer_seed(seed: int, layer: int, part: int) -> int:
    """Seed of one seeded random part of a layer (rebuilt at load time): distinct for
    every (seed, layer, part) with part < 16."""
    return (seed * 100_000 + layer) * 16 + part


def layer_rotation(spec, part: int) -> mx.array:
    """[D, D] seeded rotation of one layer's keys (KEY_ROTATION) or values; spec: a LayerSpec."""
    return randomized_hadamard(spec.head_dim, layer_seed(spec.seed, spec.layer, part))


def seeded_codecs(spec, make_codec):
    """(key codec, value codec) of a data-free method: ``make_codec(head_dim, bits, seed)`` with
    the layer's key and value seeds; spec: a LayerSpec."""
    return (make_codec(spec.head_dim, spec.key_bits, layer_seed(spec.seed, spec.layer, KEY_ROTATION)),
            make_codec(spec.value_dim, spec.value_bits, layer_seed(spec.seed, spec.layer, VALUE_ROTATION)))
