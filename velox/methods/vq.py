"""Vector quantization shared by the calibrated methods: batched k-means and
nearest-codeword search.

Calibration runs on CPU in numpy (float32, BLAS matmuls); many independent problems
(heads, sub-spaces) are solved at once as a batch dimension G.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def _assign(x: mx.array, cent: mx.array) -> tuple[mx.array, mx.array]:
    """x [G, N, d], cent [G, K, d] -> (labels [G, N], squared distance to the label [G, N])."""
    score = x @ mx.swapaxes(cent, -1, -2) - 0.5 * mx.sum(cent * cent, -1)[:, None, :]
    labels = mx.argmax(score, -1)
    best = mx.take_along_axis(score, labels[..., None], -1)[..., 0]
    return labels, mx.maximum(mx.sum(x * x, -1) - 2.0 * best, 0.0)


def kmeans_pp_init(x: mx.array, k: int, key: mx.array, weights: mx.array | None = None) -> mx.array:
    """k-means++ seeding, batched: x [G, N, d], weights [G, N] or None -> centroids [G, k, d]."""
    G, N, _ = x.shape
    logw = 0.0 if weights is None else mx.log(weights + 1e-30)
    keys = mx.random.split(key, k)
    pick = mx.random.categorical(mx.broadcast_to(logw, (G, N)), key=keys[0])
    cent = [mx.take_along_axis(x, pick[:, None, None], 1)[:, 0]]
    d2 = mx.sum((x - cent[0][:, None]) ** 2, -1)
    for i in range(1, k):
        pick = mx.random.categorical(mx.log(d2 + 1e-30) + logw, key=keys[i])
        c = mx.take_along_axis(x, pick[:, None, None], 1)[:, 0]
        cent.append(c)
        d2 = mx.minimum(d2, mx.sum((x - c[:, None]) ** 2, -1))
        if i % 32 == 0:
            mx.eval(d2)
    return mx.stack(cent, axis=1)


def kmeans(x: np.ndarray, k: int, iters: int = 8, seed: int = 0, init_sample: int = 1024,
           tol: float = 1e-3, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on G independent problems at once, on MLX's default device.

    x [G, N, d] (or [N, d]); weights [G, N] (or [N]): importance of each point, default
    uniform -> (centroids [G, k, d] float32, labels [G, N]).
    k-means++ seeding on a random subsample of ``init_sample`` points, vectorized
    iterations, early stop when the mean squared error improves by less than ``tol``
    (relative). A cluster left empty keeps its previous centroid.
    """
    squeeze = x.ndim == 2
    xn = np.asarray(x[None] if squeeze else x, dtype=np.float32)
    G, N, d = xn.shape
    if N < k:
        raise ValueError(f"k-means needs at least {k} points, got {N}")
    rng = np.random.default_rng(seed)
    X = mx.array(xn)
    w = np.ones((G, N), np.float32) if weights is None else np.asarray(weights, np.float32).reshape(G, N)
    pick = np.sort(rng.choice(N, size=min(N, init_sample), replace=False))
    cent = kmeans_pp_init(mx.array(xn[:, pick]), k, mx.random.key(seed), mx.array(w[:, pick]))
    Wt = mx.array(w)
    offset = (mx.arange(G) * k)[:, None]
    prev = np.inf
    for _ in range(iters):
        labels, d2 = _assign(X, cent)
        idx = (labels + offset).reshape(-1)
        count = mx.zeros((G * k,)).at[idx].add(Wt.reshape(-1)).reshape(G, k, 1)
        sums = mx.zeros((G * k, d)).at[idx].add((X * Wt[..., None]).reshape(-1, d)).reshape(G, k, d)
        cent = mx.where(count > 0, sums / mx.maximum(count, 1e-30), cent)
        err = (mx.sum(d2 * Wt) / mx.sum(Wt)).item()
        if prev - err < tol * err:
            break
        prev = err
    labels, _ = _assign(X, cent)
    cent, labels = np.array(cent), np.array(labels)
    return (cent[0], labels[0]) if squeeze else (cent, labels)


def take_per_head(table: mx.array, idx: mx.array) -> mx.array:
    """Per-head codeword lookup: table [H, K, d], idx [B, H, L] -> table[h, idx] [B, H, L, d]."""
    H, K, d = table.shape
    return mx.take(table.reshape(H * K, d), mx.arange(H, dtype=mx.uint32)[:, None] * K + idx.astype(mx.uint32), axis=0)


def nearest(x: mx.array, codebook: mx.array) -> mx.array:
    """Index of the nearest codeword: x [..., G, L, d], codebook [G, K, d] -> [..., G, L] uint8/uint32."""
    scores = x @ mx.swapaxes(codebook, -1, -2) - 0.5 * mx.sum(codebook * codebook, -1)[..., None, :]
    idx = mx.argmax(scores, axis=-1)
    return idx.astype(mx.uint8 if codebook.shape[-2] <= 256 else mx.uint32)


def train_sample(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` points: the top 1/8 by weight, the rest uniformly at random."""
    n = len(weights)
    if n <= size:
        return np.arange(n)
    top = np.argsort(-weights)[: size // 8]
    rest = np.setdiff1d(np.arange(n), top)
    return np.sort(np.concatenate([top, rng.choice(rest, size=size - len(top), replace=False)]))
