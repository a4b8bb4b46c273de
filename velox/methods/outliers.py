"""Outlier channels: the k key channels with the most calibration energy are kept at
8 bits (symmetric int8, one calibrated scale per channel); the other D − k channels
go to the method's own key codec, built for head_dim D − k.

Channels are picked in whole RoPE pairs (RoPE moves energy between the two members
of a pair with the position, never out of it), so k is even and a pair's scale covers
its norm. For the data-free methods (their key codec only needs the head_dim):
``--kv-outliers k`` with turboquant_mse, turboquant_prod, turboquant_rvq or qjl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..format import VeloxFormatError
from .base import tensor

SUPPORTED_METHODS = ("qjl", "turboquant_mse", "turboquant_prod", "turboquant_rvq")
MAX_OUTLIERS = 32
TENSORS = ("keys.outlier_channels", "keys.outlier_scale")  # what make_codecs reads; nothing else may be stored
LEVELS = 127  # int8 codes in -127..127


def fit(keys: np.ndarray, k: int, pairs: np.ndarray) -> dict[str, mx.array]:
    """keys [N, H, D] post-RoPE, k even, pairs [D/2, 2] (RoPE pairs) ->
    ``keys.outlier_channels`` [H, k] int32 (sorted) and ``keys.outlier_scale`` [H, k]."""
    x = keys.astype(np.float32)
    a, b = x[..., pairs[:, 0]], x[..., pairs[:, 1]]
    pair_norm = np.sqrt(a * a + b * b)                       # [N, H, D/2]
    top = np.argsort(-np.mean(pair_norm ** 2, axis=0), axis=-1)[:, : k // 2]  # [H, k/2]
    peak = np.take_along_axis(pair_norm.max(axis=0), top, axis=-1)
    channels = np.concatenate([pairs[top, 0], pairs[top, 1]], axis=-1)  # [H, k]
    order = np.argsort(channels, axis=-1)
    scale = np.concatenate([peak, peak], axis=-1) / LEVELS
    return {"keys.outlier_channels": mx.array(np.take_along_axis(channels, order, -1).astype(np.int32)),
            "keys.outlier_scale": mx.array(np.take_along_axis(scale, order, -1).astype(np.float32))}


@dataclass
class OutlierCodec:
    """channels [H, k] kept as int8 × scale [H, k]; inner codes the other channels."""

    channels: mx.array
    scale: mx.array
    inner: Any
    head_dim: int

    def __post_init__(self):
        ch = np.array(self.channels)
        rest = np.array([[c for c in range(self.head_dim) if c not in set(row)] for row in ch.tolist()])
        order = np.concatenate([ch, rest], axis=-1)
        self.rest = mx.array(rest.astype(np.int32))[None, :, None, :]
        self.gather = mx.array(ch)[None, :, None, :]
        self.inverse = mx.array(np.argsort(order, axis=-1).astype(np.int32))[None, :, None, :]

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, ...]:
        """x [B, H, L, D] -> (int8 outliers [B, H, L, k], *inner parts of the rest)."""
        x = x.astype(mx.float32)
        shape = x.shape[:3]
        out = mx.take_along_axis(x, mx.broadcast_to(self.gather, shape + self.gather.shape[-1:]), axis=-1)
        q = mx.clip(mx.round(out / self.scale[:, None, :]), -LEVELS, LEVELS).astype(mx.int8)
        rest = mx.take_along_axis(x, mx.broadcast_to(self.rest, shape + self.rest.shape[-1:]), axis=-1)
        return (q,) + tuple(self.inner.encode(rest, offset=offset))

    def decode(self, q: mx.array, *parts: mx.array, offset: int = 0) -> mx.array:
        """-> x̂ [B, H, L, D]."""
        out = q.astype(mx.float32) * self.scale[:, None, :]
        both = mx.concatenate([out, self.inner.decode(*parts, offset=offset)], axis=-1)
        return mx.take_along_axis(both, mx.broadcast_to(self.inverse, both.shape), axis=-1)


def check(method: str, k: int, head_dim: int) -> None:
    """A clear error unless ``method`` takes k outlier channels."""
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"--kv-outliers works with {', '.join(SUPPORTED_METHODS)}, not {method}")
    if not (0 < k <= min(MAX_OUTLIERS, head_dim - 2) and k % 2 == 0):
        raise ValueError(f"--kv-outliers must be an even number in 2..{min(MAX_OUTLIERS, head_dim - 2)}, got {k}")


def key_codec(tensors: dict[str, mx.array], spec, k: int, make_inner) -> OutlierCodec:
    """OutlierCodec from a layer's tensors; make_inner(head_dim) builds the method's key codec."""
    H, D = spec.num_kv_heads, spec.head_dim
    channels = tensor(tensors, "keys.outlier_channels", (H, k), mx.int32, bounds=(0, D - 1))
    if any(len(set(row)) != k for row in np.array(channels).tolist()):
        raise VeloxFormatError(f"keys.outlier_channels must hold {k} distinct channels in 0..{D - 1} per head")
    return OutlierCodec(channels, tensor(tensors, "keys.outlier_scale", (H, k), mx.float32), make_inner(D - k), D)
