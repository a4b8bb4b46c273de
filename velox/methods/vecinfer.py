"""vecinfer: smoothed, Hadamard-rotated product vector quantization of keys
(VecInfer, arXiv 2510.06175).

Keys are divided per channel by λ_c = sqrt(max |K_c|) over the calibration keys —
equivalent to multiplying the query by λ, so q·kᵀ is unchanged — which tames the
outlier channels; a randomized Hadamard rotation spreads what is left over all
coordinates. The result is cut into sub-vectors of ``d`` dimensions, each coded by
the index of its nearest centroid in a k-means codebook of that sub-space: ``bits`` =
log2(K) / d per element (2 bits: 256 centroids over 4 dimensions; 1 bit: 256 over 8).
No per-vector norm is kept, so a key costs exactly D·bits/8 bytes. Values use
turboquant_mse at the value bits.

Three choices differ from the paper, each measured on SmolLM2 (2/4 bits, ΔPPL;
docs/BENCHMARKS.md): post-RoPE as in the paper +68.6%, then
- keys coded in the pre-RoPE frame (the cache un-rotates each key at its position;
  decode re-applies RoPE), with k-means weighting each calibration key by √(attention
  it receives): +24.9%. Codebooks fitted on post-RoPE keys of positions < seq_len do
  not cover the angles later positions rotate into. λ is shared by the two dimensions
  of each RoPE pair, so it commutes with RoPE and can still be moved onto the query;
- λ divided by (E q²)^¼ of the KV group's queries per RoPE pair (query-aware: the
  paper's λ ≈ (E k²)^¼ is the query-blind case of the Cauchy-Schwarz scale in
  ``base.cauchy_schwarz_scale``): +10.8%.
One codebook per KV head measured better than one per layer (+18.6%).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import turboquant_mse
from .base import (LayerActivations, LayerSpec, attention_mass, cauchy_schwarz_scale, query_energy, tensor,
                   to_pairs)
from .rope import PreRopeCodec, spec_rope
from .rotation import KEY_ROTATION, layer_rotation
from .vq import kmeans, nearest, train_sample

DEFAULT_KEY_BITS = 2
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = (1, 2, 3, 4)
SUPPORTED_VALUE_BITS = turboquant_mse.SUPPORTED_VALUE_BITS
TENSORS = ("keys.codebooks", "keys.smooth")  # what make_codecs reads; nothing else may be stored
# bits per element -> (sub-vector dimensions d, centroids K); log2(K) / d == bits.
GEOMETRY = {1: (8, 256), 2: (4, 256), 3: (2, 64), 4: (2, 256)}
PER_HEAD = True       # one codebook per KV head (measured better than one per layer)
TRAIN_POINTS = 4096   # k-means sample per codebook (the heaviest-weighted keys always in)
WEIGHT_POWER = 0.5    # √ measured better than 1 (+13.5%)
ENCODE_CHUNK = 1024   # tokens encoded at once (bounds the [L, K] distance matrix)


@dataclass
class ProductCodec:
    """Product VQ of smoothed, rotated vectors.

    smooth [H, D] (x is divided by it); rotation [D, D] (y = x @ rotation);
    codebooks [H, M, K, d] with M·d = D.
    """

    smooth: mx.array
    rotation: mx.array
    codebooks: mx.array

    def __post_init__(self):
        H, M, K, d = self.codebooks.shape
        self.flat = self.codebooks.reshape(H * M * K, d)
        self.base = ((mx.arange(H)[:, None] * M + mx.arange(M)[None, :]) * K)[:, None, :]  # [H, 1, M]

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array]:
        """x [B, H, L, D] -> (codes [B, H, L, M] uint8,). Position-free."""
        B, H, L, D = x.shape
        _, M, K, d = self.codebooks.shape
        y = (x.astype(mx.float32) / self.smooth[:, None, :]) @ self.rotation
        y = y.reshape(B, H, L, M, d).transpose(0, 1, 3, 2, 4)  # [B, H, M, L, d]
        codes = [nearest(y[:, :, :, s:s + ENCODE_CHUNK], self.codebooks) for s in range(0, L, ENCODE_CHUNK)]
        codes = codes[0] if len(codes) == 1 else mx.concatenate(codes, axis=3)
        return (codes.transpose(0, 1, 3, 2),)

    def decode(self, codes: mx.array, offset: int = 0) -> mx.array:
        """codes [B, H, L, M] -> x̂ [B, H, L, D] float32."""
        B, H, L, M = codes.shape
        y = mx.take(self.flat, self.base + codes.astype(mx.uint32), axis=0)  # [B, H, L, M, d]
        return (y.reshape(B, H, L, -1) @ self.rotation.T) * self.smooth[:, None, :]


def fit_codebooks(y: np.ndarray, bits: int, weights: np.ndarray | None = None, per_head: bool = PER_HEAD,
                  seed: int = 0) -> np.ndarray:
    """y [N, H, D] smoothed and rotated; weights [N, H] -> codebooks [H, M, K, d] (shared: [1, M, K, d])."""
    N, H, D = y.shape
    d, K = GEOMETRY[bits]
    M = D // d
    w = np.ones((N, H)) if weights is None else weights
    rng = np.random.default_rng(seed)
    if per_head:  # all heads' sub-spaces in one batched k-means: [H·M, n, d]
        picks = [train_sample(w[:, h], TRAIN_POINTS, rng) for h in range(H)]
        sub = np.stack([y[p, h].reshape(len(p), M, d).transpose(1, 0, 2) for h, p in enumerate(picks)])
        wts = np.stack([np.broadcast_to(w[p, h], (M, len(p))) for h, p in enumerate(picks)])
        n = sub.shape[2]
        cent, _ = kmeans(sub.reshape(H * M, n, d), K, seed=seed, weights=wts.reshape(H * M, n))
        return cent.reshape(H, M, K, d)
    pick = train_sample(w.reshape(-1), TRAIN_POINTS, rng)
    sub = y.reshape(N * H, M, d)[pick].transpose(1, 0, 2)
    cent, _ = kmeans(sub, K, seed=seed, weights=np.broadcast_to(w.reshape(-1)[pick], (M, len(pick))))
    return cent[None]


def calibrate(acts: LayerActivations, spec: LayerSpec, query_aware: bool = True,
              per_head: bool = PER_HEAD) -> dict[str, mx.array]:
    """Tensors ``keys.smooth`` [H, D] and ``keys.codebooks`` [H, M, K, d] for one layer."""
    if spec.head_dim % GEOMETRY[spec.key_bits][0]:
        raise ValueError(f"vecinfer: head_dim {spec.head_dim} is not a multiple of the "
                         f"{GEOMETRY[spec.key_bits][0]}-dim sub-vectors of {spec.key_bits}-bit keys")
    rope = spec_rope(spec)
    k = acts.keys_pre_rope.astype(np.float32)
    peak = np.abs(k).max(axis=0)  # [H, D]
    peak = to_pairs(np.maximum(peak[:, rope.pairs[:, 0]], peak[:, rope.pairs[:, 1]]), rope.pairs)
    smooth = np.sqrt(np.maximum(peak, 1e-4))
    if query_aware:
        # λ ≈ (E k²)^(1/4) is the query-blind case of the Cauchy-Schwarz scale; dividing it
        # by (E q²)^(1/4) per RoPE pair moves precision to the pairs queries read.
        smooth = smooth / cauchy_schwarz_scale(query_energy(acts, rope.pairs), np.ones_like(smooth))
    y = (k / smooth) @ np.array(layer_rotation(spec, KEY_ROTATION))
    weights = attention_mass(acts) ** WEIGHT_POWER
    books = fit_codebooks(y, spec.key_bits, weights, per_head, seed=spec.seed + spec.layer)
    return {"keys.smooth": mx.array(smooth), "keys.codebooks": mx.array(books)}


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[PreRopeCodec, object]:
    """(key codec, value codec) for one layer; ``spec.rope`` is the layer's rope module."""
    rope = spec_rope(spec)
    H, D = spec.num_kv_heads, spec.head_dim
    d, K = GEOMETRY[spec.key_bits]
    books = tensor(tensors, "keys.codebooks", (None, D // d, K, d), mx.float32)
    if books.shape[0] not in (1, H):
        books = tensor(tensors, "keys.codebooks", (H, D // d, K, d))
    inner = ProductCodec(smooth=tensor(tensors, "keys.smooth", (H, D), mx.float32),
                         rotation=layer_rotation(spec, KEY_ROTATION), codebooks=mx.broadcast_to(books, (H, D // d, K, d)))
    _, values = turboquant_mse.make_codecs({}, spec)
    return PreRopeCodec(inner, rope), values
