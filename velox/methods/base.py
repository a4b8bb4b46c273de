"""What every method module receives: one layer's activations and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class LayerActivations:
    """Calibration activations of one attention layer (float16 numpy, N tokens).

    keys [N, H_kv, D] after RoPE (what caches receive); keys_pre_rope [N, H_kv, D];
    values [N, H_kv, D]; queries [N, H_q, D] after RoPE; positions [N].
    """

    keys: np.ndarray
    keys_pre_rope: np.ndarray
    values: np.ndarray
    queries: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class LayerSpec:
    """Settings of one layer's cache for one method.

    rope: the layer's rope module (given at load time; methods that code keys before
    RoPE need it).
    """

    layer: int
    num_kv_heads: int
    head_dim: int
    key_bits: int
    value_bits: int
    seed: int = 0
    rope: Any = None


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
