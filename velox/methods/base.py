"""What every method module receives: one layer's activations and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..format import ARTIFACT_FILE, VeloxFormatError


@dataclass
class LayerActivations:
    """Calibration activations of one attention layer (float16 numpy, N tokens).

    keys [N, H_kv, D] after RoPE (what caches receive); keys_pre_rope [N, H_kv, D];
    values [N, H_kv, D]; queries [N, H_q, D] after RoPE, or None where capture could not
    record them (see ``convert.capture``); positions [N].
    """

    keys: np.ndarray
    keys_pre_rope: np.ndarray
    values: np.ndarray
    queries: Optional[np.ndarray]
    positions: np.ndarray


@dataclass(frozen=True)
class LayerSpec:
    """Settings of one layer's cache for one method.

    rope: the layer's rope module (given at load time; methods that code keys before
    RoPE need it). value_head_dim: the values' head_dim where it differs from the keys'
    (MLA-style latent caches; data-free methods only).
    """

    layer: int
    num_kv_heads: int
    head_dim: int
    key_bits: int
    value_bits: int
    seed: int = 0
    rope: Any = None
    value_head_dim: Optional[int] = None

    @property
    def value_dim(self) -> int:
        """The values' head_dim."""
        return self.value_head_dim or self.head_dim


def no_calibration(acts: LayerActivations, spec: LayerSpec) -> dict:
    """``calibrate`` of the data-free methods: their rotations are rebuilt from the seed."""
    return {}


def attention_mass(acts: LayerActivations) -> np.ndarray:
    """Attention each calibration token receives, summed over the queries of its KV group.

    Causal softmax attention is recomputed per calibration sequence (positions
    restart at 0). Returns [N, H_kv] float64.
    """
    q = acts.queries.astype(np.float32)
    k = acts.keys.astype(np.float32)
    N, Hq, D = q.shape
    Hk = k.shape[1]
    starts = np.flatnonzero(acts.positions == 0).tolist() + [N]
    out = np.zeros((N, Hk))
    for s, e in zip(starts[:-1], starts[1:]):
        qs = np.ascontiguousarray(q[s:e].transpose(1, 0, 2)).reshape(Hk, Hq // Hk, e - s, D)
        ks = np.ascontiguousarray(k[s:e].transpose(1, 0, 2))[:, None]
        scores = (qs @ ks.swapaxes(-1, -2)) / np.sqrt(D)
        scores = np.where(np.tri(e - s, dtype=bool), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out[s:e] = probs.sum(axis=(1, 2)).T
    return out


def tensor(tensors: dict, name: str, shape: tuple, dtype=None, bounds: Optional[tuple[int, int]] = None):
    """``tensors[name]`` checked against ``shape`` (None = any size) and cast to ``dtype``.

    Every read of an artifact tensor goes through here, so a corrupt file fails with a
    VeloxFormatError naming the tensor rather than inside MLX or as a silently wrong cache:
    a float ``dtype`` requires a stored float tensor with no NaN/Inf, an integer ``dtype``
    a stored integer tensor whose values lie in ``bounds`` (lo, hi) when given (checked
    before the cast, which could wrap them).
    """
    if name not in tensors:
        raise VeloxFormatError(f"{ARTIFACT_FILE}: missing tensor {name!r}")
    t = tensors[name]
    ok = len(t.shape) == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor {name!r} has shape {list(t.shape)}, expected {want}")
    if dtype is None:
        return t
    floating = mx.issubdtype(dtype, mx.floating)
    if not mx.issubdtype(t.dtype, mx.floating if floating else mx.integer):
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor {name!r} is {str(t.dtype).split('.')[-1]}, expected "
                               f"{'a floating-point' if floating else 'an integer'} dtype")
    if floating and not mx.all(mx.isfinite(t)).item():
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor {name!r} holds NaN or Inf")
    if bounds is not None and t.size and not (bounds[0] <= mx.min(t).item() and mx.max(t).item() <= bounds[1]):
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor {name!r} has values outside {bounds[0]}..{bounds[1]}")
    return t.astype(dtype)


def to_pairs(per_pair: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """[..., D/2] one value per RoPE pair -> [..., D] with the value on both dims of its pair."""
    out = np.empty(per_pair.shape[:-1] + (2 * pairs.shape[0],), np.float32)
    out[..., pairs[:, 0]] = per_pair
    out[..., pairs[:, 1]] = per_pair
    return out


def pair_energy(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """x [N, ..., D] -> mean energy of each RoPE pair, on both its dims [..., D].

    RoPE rotates within pairs, so this is the same before and after RoPE.
    """
    a, b = x[..., pairs[:, 0]].astype(np.float32), x[..., pairs[:, 1]].astype(np.float32)
    return to_pairs(np.mean(a * a + b * b, axis=0), pairs)


def query_energy(acts: LayerActivations, pairs: np.ndarray) -> np.ndarray:
    """Mean RoPE-pair energy of the calibration queries of each KV head's group -> [H_kv, D]."""
    Hq, Hk = acts.queries.shape[1], acts.keys.shape[1]
    e = pair_energy(acts.queries, pairs)  # [Hq, D]
    return e.reshape(Hk, Hq // Hk, -1).mean(axis=1)


def cauchy_schwarz_scale(query_e: np.ndarray, key_e: np.ndarray) -> np.ndarray:
    """Per-dim key scale s = (E q² / E e²)^(1/4), geometric mean 1 per head: [H, D].

    Coding k·s and reading with q/s leaves q·k unchanged; if the coding error of k·s is
    spread evenly over dimensions (rotation-based codes), the score error variance is
    ∝ (Σ s² E e²)(Σ E q² / s²), which this s minimises. Equal within RoPE pairs when
    both inputs are, so it commutes with RoPE.
    """
    s = (np.maximum(query_e, 1e-12) / np.maximum(key_e, 1e-12)) ** 0.25
    return (s / np.exp(np.mean(np.log(s), axis=-1, keepdims=True))).astype(np.float32)
