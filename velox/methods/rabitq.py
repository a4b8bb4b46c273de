"""rabitq: 1-bit keys with RaBitQ's unbiased inner-product estimator over IVF
centroids (RaBitQ, SIGMOD 2024; KV use as in Ascend-RaBitQ).

Per (layer, KV head), calibration fits ``nlist`` coarse centroids by k-means on the
pre-RoPE calibration keys (the cache un-rotates each key at its position, so the
centroids do not have to cover every RoPE angle). A key o_r is coded as: its nearest
centroid c (uint8 id), the sign bits x̄ of P⁻¹o where o = (o_r − c)/‖o_r − c‖ and P is
a seeded randomized Hadamard rotation (D/8 bytes), and one fp16 scalar
‖o_r − c‖ / ⟨ō, o⟩ with ō = P·x̄/√D. RaBitQ's estimator

    ⟨o_r, q⟩ ≈ ⟨c, q⟩ + ‖o_r − c‖ · ⟨ō, q⟩ / ⟨ō, o⟩

is linear in q, so it equals q · k̂ for k̂ = c + (‖o_r − c‖/⟨ō, o⟩)·ō: ``decode`` returns
that k̂ and attention on it computes exactly the estimator (not the biased plain sign
reconstruction c + ‖o_r − c‖·ō). Only the ratio of the paper's two per-vector scalars
enters the estimator, so one fp16 is stored instead of two. ``inner_products`` computes
the same scores straight from the bits (⟨ō, q⟩ = ⟨x̄, P⁻¹q⟩/√D), the form a fused kernel uses.
Values use turboquant_mse (4 bits by default).

Measured on SmolLM2 (1-bit keys, 4-bit values, ΔPPL; docs/BENCHMARKS.md): centroids of
pre-RoPE keys +70%; + weighting by √(attention received) +72% (no change); + each RoPE
pair of the coded space scaled by (E q² / E r²)^¼ (``base.cauchy_schwarz_scale``; q·k
is unchanged and the estimator stays unbiased) +34%; nlist 256 instead of 64 +29% at
three times the fit time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..format import VeloxFormatError
from . import turboquant_mse
from .base import (LayerActivations, LayerSpec, attention_mass, cauchy_schwarz_scale, pair_energy,
                   query_energy, tensor)
from .rope import PreRopeCodec, spec_rope
from .rotation import KEY_ROTATION, layer_rotation
from .scalar import pack_signs, unpack_signs
from .vq import kmeans, nearest, take_per_head

DEFAULT_KEY_BITS = 1
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = (1,)
SUPPORTED_VALUE_BITS = turboquant_mse.SUPPORTED_VALUE_BITS
TENSORS = ("keys.centroids", "keys.scale")  # what make_codecs reads; nothing else may be stored
DEFAULT_NLIST = 64  # SmolLM2: 8192 calibration keys per head -> 128 per centroid
WEIGHT_POWER = 0.5  # k-means weights: √(attention each calibration key receives)


@dataclass
class RaBitQCodec:
    """centroids [H, C, D] (C ≤ 256) in the scaled space; rotation P [D, D] with
    P⁻¹o = o @ rotation; scale [H, D]: keys are coded as k·scale (queries read q/scale)."""

    centroids: mx.array
    rotation: mx.array
    scale: mx.array | None = None

    def encode_with_ip(self, x: mx.array) -> tuple[tuple[mx.array, mx.array, mx.array], mx.array]:
        """x [B, H, L, D] -> ((words [B, H, L, D/32] uint32, ids [B, H, L] uint8,
        factor [B, H, L] fp16), ⟨ō, o⟩ [B, H, L])."""
        x = x.astype(mx.float32)
        if self.scale is not None:
            x = x * self.scale[:, None, :]
        ids = nearest(x, self.centroids)
        r = x - take_per_head(self.centroids, ids)
        norm = mx.sqrt(mx.sum(r * r, axis=-1))
        y = (r / mx.maximum(norm, 1e-20)[..., None]) @ self.rotation
        ip = mx.sum(mx.abs(y), axis=-1) / math.sqrt(x.shape[-1])  # ⟨ō, o⟩ ∈ (0, 1]
        words = pack_signs(y)
        factor = (norm / mx.maximum(ip, 1e-6)).astype(mx.float16)
        return (words, ids, factor), ip

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, mx.array, mx.array]:
        """x [B, H, L, D] -> (words, centroid ids, factor); position-free (see PreRopeCodec)."""
        return self.encode_with_ip(x)[0]

    def decode(self, words: mx.array, ids: mx.array, factor: mx.array, offset: int = 0) -> mx.array:
        """-> k̂ [B, H, L, D] with q·k̂ equal to RaBitQ's estimate of q·k."""
        D = self.centroids.shape[-1]
        signs = unpack_signs(words, D)
        o_bar = (signs / math.sqrt(D)) @ self.rotation.T
        k = take_per_head(self.centroids, ids) + factor[..., None].astype(mx.float32) * o_bar
        return k if self.scale is None else k / self.scale[:, None, :]

    def inner_products(self, q: mx.array, words: mx.array, ids: mx.array, factor: mx.array) -> mx.array:
        """Estimated scores from the codes: q [B, H, Lq, D] -> [B, H, Lq, L]."""
        D = self.centroids.shape[-1]
        q = q.astype(mx.float32) if self.scale is None else q.astype(mx.float32) / self.scale[:, None, :]
        signs = unpack_signs(words, D)  # x̄ as ±1
        q_rot = q @ self.rotation                                           # P⁻¹q
        ip_oq = (q_rot @ mx.swapaxes(signs, -1, -2)) / math.sqrt(D)         # ⟨ō, q⟩
        cq = q.astype(mx.float32) @ mx.swapaxes(self.centroids, -1, -2)     # [B, H, Lq, C]
        c_part = mx.take_along_axis(cq, mx.broadcast_to(ids[:, :, None, :].astype(mx.uint32),
                                                        cq.shape[:3] + ids.shape[-1:]), axis=-1)
        return c_part + factor[:, :, None, :].astype(mx.float32) * ip_oq


def calibrate(acts: LayerActivations, spec: LayerSpec, nlist: int = DEFAULT_NLIST,
              scale_for_queries: bool = True) -> dict[str, mx.array]:
    """Tensors ``keys.scale`` [H, D] and ``keys.centroids`` [H, nlist, D] (in the scaled
    pre-RoPE space): weighted k-means of the pre-RoPE keys per head."""
    if not 1 <= nlist <= 256:
        raise ValueError(f"rabitq: nlist must be in 1..256, got {nlist}")
    rope = spec_rope(spec)
    k = acts.keys_pre_rope.astype(np.float32)                      # [N, H, D]
    weights = (attention_mass(acts) ** WEIGHT_POWER).T             # [H, N]
    seed = spec.seed + spec.layer
    scale = np.ones((spec.num_kv_heads, spec.head_dim), np.float32)
    if scale_for_queries:
        cent, labels = kmeans(k.transpose(1, 0, 2), nlist, seed=seed, weights=weights)
        residual = k - np.take_along_axis(cent, labels[..., None], 1).transpose(1, 0, 2)
        # RaBitQ's error is spread evenly by the random rotation: Cauchy-Schwarz scaling applies.
        scale = cauchy_schwarz_scale(query_energy(acts, rope.pairs), pair_energy(residual, rope.pairs))
    cent, _ = kmeans((k * scale).transpose(1, 0, 2), nlist, seed=seed, weights=weights)
    return {"keys.scale": mx.array(scale), "keys.centroids": mx.array(cent)}


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[PreRopeCodec, object]:
    """(key codec, value codec) for one layer; ``spec.rope`` is the layer's rope module."""
    rope = spec_rope(spec)
    cent = tensor(tensors, "keys.centroids", (spec.num_kv_heads, None, spec.head_dim), mx.float32)
    if not 1 <= cent.shape[1] <= 256:
        raise VeloxFormatError(f"rabitq: keys.centroids holds {cent.shape[1]} centroids per head (1..256 allowed)")
    scale = tensor(tensors, "keys.scale", (spec.num_kv_heads, spec.head_dim), mx.float32)
    keys = PreRopeCodec(RaBitQCodec(cent, layer_rotation(spec, KEY_ROTATION), scale), rope)
    _, values = turboquant_mse.make_codecs({}, spec)
    return keys, values
