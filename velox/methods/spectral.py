"""spectral: calibrated eigenbasis rotation with water-filled bits per direction.

Keys, per (layer, KV head), in the pre-RoPE frame (the cache un-rotates each key at
its position, codes it, and re-applies RoPE when decoding, so the basis does not
depend on where a key lands): centre by the calibration mean, normalise each vector
(its norm is kept in fp16), rotate into the eigenbasis of the calibration
directions, give each eigen-direction a bit width by greedy reverse water-filling
on its variance (more bits where the variance is), and fit one scalar codebook per
group of directions sharing a bit width on the standardised data.

Choices measured on SmolLM2 (docs/BENCHMARKS.md):
- pre-RoPE keys: a basis of post-RoPE keys fitted on positions < seq_len starves
  the directions later positions rotate into (3-bit keys alone: +6.8% ΔPPL even
  fitted at random positions, +2.3% pre-RoPE);
- statistics are weighted by the square root of the attention each calibration
  token receives, so rare attention-sink tokens keep bits (ΔPPL 39% -> 3%).
Values are coded with turboquant_mse's data-free rotation: an eigenbasis measured
worse for them (3-bit values alone: +3.3% ΔPPL vs +1.3%), because the error that
matters is the output's, not the values' variance.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..format import ARTIFACT_FILE, VeloxFormatError
from . import turboquant_mse
from .base import LayerActivations, LayerSpec, attention_mass, tensor
from .rope import PreRopeCodec, spec_rope
from .scalar import MAX_BITS, ScalarCodec, fit_levels, gaussian_distortion, sphere_levels

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_KEY_BITS = (1, 2, 3, 4, 5, 6)
SUPPORTED_VALUE_BITS = turboquant_mse.SUPPORTED_VALUE_BITS
PARTS = ("mean", "basis", "scale", "bits", "levels")
TENSORS = tuple(f"keys.{p}" for p in PARTS)  # what make_codecs reads; nothing else may be stored
WEIGHT_POWER = 0.5


def allocate_bits(variances: np.ndarray, total_bits: int, max_bits: int = MAX_BITS) -> np.ndarray:
    """Integer bits per direction with sum == total_bits minimising Σ var·d(bits).

    d(b) is the Lloyd-Max Gaussian distortion; the greedy gives each next bit to the
    direction whose error drops most, which is optimal because d is convex.
    variances [D] -> bits [D] int.
    """
    gain = np.array([gaussian_distortion(b) - gaussian_distortion(b + 1) for b in range(max_bits)] + [-np.inf])
    bits = np.zeros(len(variances), dtype=np.int64)
    for _ in range(total_bits):
        bits[int(np.argmax(variances * gain[bits]))] += 1
    return bits


def pair_eigenbasis(cov: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues [D] and a basis [D, D] that rotates only within each RoPE pair: column a and b
    of pair (a, b) are the eigenvectors of cov's 2×2 block, made a rotation (det +1). Such a
    basis commutes with RoPE, so attention can rotate the query into it once per step."""
    D = cov.shape[0]
    eigval, basis = np.zeros(D), np.zeros((D, D))
    for a, b in pairs:
        idx = np.ix_([a, b], [a, b])
        val, vec = np.linalg.eigh(cov[idx])
        if np.linalg.det(vec) < 0:
            vec[:, 1] = -vec[:, 1]
        eigval[[a, b]], basis[idx] = val, vec
    return eigval, basis


def fit_head(x: np.ndarray, bits: int, weights: np.ndarray | None = None,
             seed: int = 0, pairs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Calibrate one head.

    x [N, D]; weights [N] (importance of each token, default uniform); pairs [D/2, 2]: the
    RoPE pairs, to restrict the basis to rotations within them (``pair_eigenbasis``), else
    the full eigenbasis -> mean [D], basis [D, D] orthogonal, scale [D], bits [D] int,
    levels [D, 2**max(bits)].
    """
    x = x.astype(np.float64)
    N, D = x.shape
    w = np.ones(N) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = w @ x
    c = x - mean
    u = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-20)
    cov = (u * w[:, None]).T @ u
    if pairs is None:
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, basis = np.maximum(eigval[order], 1e-12), eigvec[:, order]
    else:  # directions stay at their dims: the basis keeps RoPE's pair structure
        eigval, basis = pair_eigenbasis(cov, pairs)
        eigval = np.maximum(eigval, 1e-12)
    alloc = allocate_bits(eigval, bits * D, max_bits=min(MAX_BITS, 2 * bits))
    scale = np.sqrt(eigval)
    z = (u @ basis) / scale
    # Weighted Lloyd by resampling tokens in proportion to their weight (deterministic).
    z = z[np.random.default_rng(seed).choice(N, size=N, p=w)]
    K = 1 << int(alloc.max())
    levels = np.zeros((D, K))
    for b in np.unique(alloc):
        dirs = np.nonzero(alloc == b)[0]
        if b == 0:
            lv = np.array([0.0])
        else:
            init = np.array(sphere_levels(int(b), 10_000))  # ≈ Gaussian Lloyd-Max
            lv = fit_levels(z[:, dirs].reshape(-1), int(b), init=init)
        levels[dirs] = np.concatenate([lv, np.full(K - len(lv), lv[-1])])
    return {"mean": mean, "basis": basis, "scale": scale, "bits": alloc, "levels": levels}


def fit(x: np.ndarray, bits: int, weights: np.ndarray | None = None, seed: int = 0,
        pairs: np.ndarray | None = None) -> dict[str, mx.array]:
    """x [N, H, D], weights [N, H] or None, pairs as ``fit_head``'s -> tensors stacked over
    heads (levels padded)."""
    heads = [fit_head(x[:, h], bits, None if weights is None else weights[:, h], seed + h, pairs)
             for h in range(x.shape[1])]
    K = max(h["levels"].shape[1] for h in heads)
    for h in heads:
        lv = h["levels"]
        h["levels"] = np.concatenate([lv, np.repeat(lv[:, -1:], K - lv.shape[1], axis=1)], axis=1)
    return {part: mx.array(np.stack([h[part] for h in heads]).astype(np.int32 if part == "bits" else np.float32))
            for part in PARTS}


BASES = ("full", "pairs")


def calibrate(acts: LayerActivations, spec: LayerSpec, basis: str = "full") -> dict[str, mx.array]:
    """Tensors ``keys.<part>`` for one layer (values need none). basis: "full" (the eigenbasis
    of all D dims) or "pairs" (rotations within RoPE pairs only, ``pair_eigenbasis``)."""
    if basis not in BASES:
        raise ValueError(f"spectral: basis must be one of {', '.join(BASES)}, got {basis!r}")
    weights = attention_mass(acts) ** WEIGHT_POWER
    pairs = spec_rope(spec).pairs if basis == "pairs" else None
    tensors = fit(acts.keys_pre_rope, spec.key_bits, weights, seed=spec.seed, pairs=pairs)
    return {f"keys.{part}": arr for part, arr in tensors.items()}


def codec_from_tensors(t: dict[str, mx.array], spec: LayerSpec | None = None, prefix: str = "") -> ScalarCodec:
    """ScalarCodec from tensors ``{prefix}mean``, basis, scale, bits, levels (as ``fit`` returns
    them), each read through ``base.tensor``. With ``spec`` (a folder being loaded) they must
    also have its heads and head_dim and spend exactly key_bits·D bits per head; every head
    needs a level for each of its codes."""
    H, D = (spec.num_kv_heads, spec.head_dim) if spec else (None, None)
    bits = np.array(tensor(t, prefix + "bits", (H, D), mx.int32, bounds=(0, MAX_BITS)))
    H, D = bits.shape
    total = spec.key_bits * D if spec else int(bits.sum(axis=-1).max())
    if (bits.sum(axis=-1) != total).any():
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor '{prefix}bits' must give each head {total} bits "
                               f"in all, got {bits.sum(axis=-1).tolist()}")
    levels = tensor(t, prefix + "levels", (H, D, None), mx.float32)
    if not 1 << int(bits.max()) <= levels.shape[-1] <= 1 << MAX_BITS:
        raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor '{prefix}levels' has {levels.shape[-1]} levels per "
                               f"direction, expected {1 << int(bits.max())} (2**max bits) to {1 << MAX_BITS}")
    return ScalarCodec(rotation=tensor(t, prefix + "basis", (H, D, D), mx.float32),
                       scale=tensor(t, prefix + "scale", (H, D), mx.float32), levels=levels, bits=bits,
                       mean=tensor(t, prefix + "mean", (H, D), mx.float32))


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[PreRopeCodec, ScalarCodec]:
    """(key codec, value codec) for one layer; ``spec.rope`` is the layer's rope module."""
    keys = PreRopeCodec(codec_from_tensors(tensors, spec, "keys."), spec_rope(spec))
    _, values = turboquant_mse.make_codecs({}, spec)
    return keys, values
