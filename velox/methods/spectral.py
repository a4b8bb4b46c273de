"""spectral: calibrated eigenbasis rotation with water-filled bits per direction.

Per (layer, KV head) and separately for keys and values: centre by the calibration
mean, normalise each vector (its norm is kept in fp16), rotate into the eigenbasis of
the calibration directions, give each eigen-direction a bit width by greedy reverse
water-filling on its variance (more bits where the variance is), and fit one scalar
codebook per group of directions sharing a bit width on the standardised data.

Keys are calibrated at random positions over the whole context (RoPE re-applied
to the pre-RoPE keys) so the basis holds wherever a key lands.
Statistics are weighted by the attention each calibration token receives (its
square root): attention-sink tokens are rare but carry most of the attention, and
an unweighted eigenbasis leaves their directions with no bits at all.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import LayerActivations, LayerSpec, attention_mass
from .scalar import MAX_BITS, ScalarCodec, fit_levels, gaussian_distortion, sphere_levels

DEFAULT_KEY_BITS = 4
DEFAULT_VALUE_BITS = 4
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6)
PARTS = ("mean", "basis", "scale", "bits", "levels")
WEIGHT_POWER = 0.5
USE_QUERY_METRIC = True


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


QUERY_METRIC_RIDGE = 0.01


def query_metric(query_cov: np.ndarray, ridge: float = QUERY_METRIC_RIDGE) -> np.ndarray:
    """Σ_q^{1/2} (with a ridge of ``ridge``·mean eigenvalue): [D, D] -> [D, D] symmetric.

    Coding M·k instead of k makes squared error equal the error of the attention
    logit q·k on average over queries: directions that queries ignore get no bits.
    """
    D = query_cov.shape[-1]
    cov = query_cov + ridge * np.trace(query_cov) / D * np.eye(D)
    w, U = np.linalg.eigh(cov)
    return (U * np.sqrt(np.maximum(w, 1e-12))) @ U.T


def fit_head(x: np.ndarray, bits: int, weights: np.ndarray | None = None,
             seed: int = 0, metric: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Calibrate one head.

    x [N, D]; weights [N] (importance of each token, default uniform); metric [D, D]
    (code x @ metric, e.g. ``query_metric``) -> mean [D], basis [D, D] (x ↦ y, not
    orthogonal when a metric is given), scale [D], bits [D] int, levels [D, 2**max(bits)].
    """
    x = x.astype(np.float64)
    N, D = x.shape
    w = np.ones(N) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = w @ x
    c = x - mean
    if metric is not None:
        c = c @ metric
    u = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-20)
    eigval, eigvec = np.linalg.eigh((u * w[:, None]).T @ u)
    order = np.argsort(eigval)[::-1]
    eigval, basis = np.maximum(eigval[order], 1e-12), eigvec[:, order]
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
    if metric is not None:
        basis = metric @ basis
    return {"mean": mean, "basis": basis, "scale": scale, "bits": alloc, "levels": levels}


def fit(x: np.ndarray, bits: int, weights: np.ndarray | None = None, seed: int = 0,
        metrics: np.ndarray | None = None) -> dict[str, mx.array]:
    """x [N, H, D], weights [N, H], metrics [H, D, D] or None -> tensors stacked over heads."""
    heads = [fit_head(x[:, h], bits, None if weights is None else weights[:, h], seed + h,
                      None if metrics is None else metrics[h])
             for h in range(x.shape[1])]
    K = max(h["levels"].shape[1] for h in heads)
    for h in heads:
        lv = h["levels"]
        h["levels"] = np.concatenate([lv, np.repeat(lv[:, -1:], K - lv.shape[1], axis=1)], axis=1)
    return {part: mx.array(np.stack([h[part] for h in heads]).astype(np.int32 if part == "bits" else np.float32))
            for part in PARTS}


def calibrate(acts: LayerActivations, spec: LayerSpec) -> dict[str, mx.array]:
    """Tensors ``keys.<part>`` and ``values.<part>`` for one layer."""
    weights = attention_mass(acts) ** WEIGHT_POWER
    tensors = {}
    # Keys at random positions: the eigenbasis of post-RoPE keys seen only at
    # positions < seq_len leaves later positions' rotated directions without bits.
    key_metrics = None
    if USE_QUERY_METRIC and acts.query_cov is not None:
        key_metrics = np.stack([query_metric(c) for c in acts.query_cov])
    for kind, x, b, metrics in (("keys", acts.keys_any_position, spec.key_bits, key_metrics),
                                ("values", acts.values, spec.value_bits, None)):
        for part, arr in fit(x, b, weights, seed=spec.seed, metrics=metrics).items():
            tensors[f"{kind}.{part}"] = arr
    return tensors


def codec_from_tensors(t: dict[str, mx.array]) -> ScalarCodec:
    """ScalarCodec from one kind's tensors (mean, basis, scale, bits, levels)."""
    inverse = mx.array(np.linalg.inv(np.array(t["basis"], dtype=np.float64)).astype(np.float32))
    return ScalarCodec(rotation=t["basis"], scale=t["scale"], levels=t["levels"],
                       bits=np.array(t["bits"]), mean=t["mean"], inverse=inverse)


def make_codecs(tensors: dict[str, mx.array], spec: LayerSpec) -> tuple[ScalarCodec, ScalarCodec]:
    """(key codec, value codec) for one layer from its calibrated tensors."""
    pick = lambda kind: {p: tensors[f"{kind}.{p}"] for p in PARTS}
    return codec_from_tensors(pick("keys")), codec_from_tensors(pick("values"))
