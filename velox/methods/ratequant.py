"""ratequant: per-(layer, KV head, K/V) bit allocation for any method (arXiv 2605.06675).

Calibration quantizes each layer's keys (then values) with the method at every
candidate bit width, runs causal attention on the calibration queries, and measures
each KV head's attention-output error D(b) (squared error, over the layer's mean
output energy per head). A fit D(b) = α·β^(−b) per (layer, head, K/V) gives every
quantizer its own decay rate (the paper's point: one shared model misorders heads),
and reverse water-filling gives integer bits whose average is exactly the requested
one: starting from the lowest width, each next bit goes where α·β^(−b)·(1 − 1/β), the
error it removes, is largest (optimal because D is convex in b).

A layer whose heads have different widths stores the method's tensors once per width
used (``bits<b>.`` prefix, calibrated at that width) and is served by a
``HeadGroupCodec``: heads of equal width are coded together, so a cache holds exactly
each head's bits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from .base import LayerActivations, LayerSpec

CANDIDATE_BITS = (1, 2, 3, 4)
SENSITIVITY_SEQUENCES = 4  # calibration sequences used to measure output errors


def candidate_bits(module: ModuleType, kind: str, candidates: Sequence[int] = CANDIDATE_BITS) -> list[int]:
    """The candidate widths a method supports for keys (kind 'key') or values ('value')."""
    supported = getattr(module, f"SUPPORTED_{kind.upper()}_BITS")
    return [b for b in candidates if b in supported]


def width_spec(module: ModuleType, spec: LayerSpec, bits: int, heads: int | None = None) -> LayerSpec:
    """The LayerSpec under which a layer's tensors for width ``bits`` are calibrated: keys and
    values at ``bits`` where supported, otherwise the nearest supported width."""
    def near(kind):
        cands = getattr(module, f"SUPPORTED_{kind.upper()}_BITS")
        return min(cands, key=lambda c: (abs(c - bits), c))
    return replace(spec, key_bits=near("key"), value_bits=near("value"),
                   num_kv_heads=spec.num_kv_heads if heads is None else heads)


def _sequences(acts: LayerActivations, limit: int):
    starts = np.flatnonzero(acts.positions == 0).tolist() + [len(acts.positions)]
    for s, e in list(zip(starts[:-1], starts[1:]))[:limit]:
        yield tuple(mx.array(np.ascontiguousarray(a[s:e].transpose(1, 0, 2)).astype(np.float32))[None]
                    for a in (acts.queries, acts.keys, acts.values))


def output_errors(acts: LayerActivations, key_codec: Any, value_codec: Any,
                  sequences: int = SENSITIVITY_SEQUENCES) -> tuple[np.ndarray, np.ndarray]:
    """Attention-output error per KV head with only K (then only V) quantized -> ([H], [H]).

    Squared error summed over the head's query group, divided by the layer's mean
    output energy per KV head, so heads and layers compare on one scale.
    """
    err_k = err_v = energy = 0.0
    for q, k, v in _sequences(acts, sequences):
        H, D = k.shape[1], k.shape[-1]
        attend = lambda kk, vv: mx.fast.scaled_dot_product_attention(q, kk, vv, scale=D ** -0.5, mask="causal")
        out = attend(k, v)
        k_hat = key_codec.decode(*key_codec.encode(k, offset=0), offset=0)
        v_hat = value_codec.decode(*value_codec.encode(v, offset=0), offset=0)
        per_head = lambda x: np.array(mx.sum(x.reshape(H, -1) ** 2, axis=-1))
        err_k = err_k + per_head(attend(k_hat, v) - out)
        err_v = err_v + per_head(attend(k, v_hat) - out)
        energy = energy + per_head(out)
    scale = np.mean(energy)
    return err_k / scale, err_v / scale


def fit_distortion(bits: Sequence[int], errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of log D = log α − b·log β: errors [..., len(bits)] -> (α [...], β [...]).

    β is kept ≥ 1.01 (more bits never hurt); one width gives β = 4 (6 dB per bit).
    """
    b = np.asarray(bits, np.float64)
    logd = np.log(np.maximum(errors, 1e-12))
    if len(b) == 1:
        beta = np.full(logd.shape[:-1], 4.0)
        return np.exp(logd[..., 0]) * beta ** b[0], beta
    slope = ((b - b.mean()) * (logd - logd.mean(-1, keepdims=True))).sum(-1) / ((b - b.mean()) ** 2).sum()
    beta = np.exp(np.maximum(-slope, math.log(1.01)))
    alpha = np.exp(logd.mean(-1) + b.mean() * np.log(beta))
    return alpha, beta


def allocate(alpha: np.ndarray, beta: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: int) -> np.ndarray:
    """Integer bits per unit (flat arrays [U]) with sum == total, lo ≤ bits ≤ hi, minimising
    Σ α·β^(−bits) by greedy reverse water-filling."""
    bits = lo.astype(np.int64).copy()
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"cannot spend {total} bits on {len(bits)} quantizers with widths "
                         f"{int(lo.min())}..{int(hi.max())} each")
    gain = lambda u: alpha[u] * beta[u] ** (-float(bits[u])) * (1.0 - 1.0 / beta[u])
    heap = [(-gain(u), u) for u in range(len(bits)) if bits[u] < hi[u]]
    heapq.heapify(heap)
    for _ in range(total - int(bits.sum())):
        _, u = heapq.heappop(heap)
        bits[u] += 1
        if bits[u] < hi[u]:
            heapq.heappush(heap, (-gain(u), u))
    return bits


@dataclass
class HeadGroupCodec:
    """Codes each group of heads with its own codec: groups = [(heads [h], codec)].

    encode returns every group's parts in turn; decode puts the heads back in order.
    """

    groups: list[tuple[list[int], Any]]
    head_dim: int

    def __post_init__(self):
        order = [h for heads, _ in self.groups for h in heads]
        self.inverse = mx.array(np.argsort(order).astype(np.int32))
        self.head_index = [mx.array(heads) for heads, _ in self.groups]
        self.n_parts = [len(codec.encode(mx.zeros((1, len(heads), 1, self.head_dim))))
                        for heads, codec in self.groups]

    @property
    def num_heads(self) -> int:
        """H: every group's heads (each part holds only its group's)."""
        return len(self.inverse)

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, ...]:
        """x [B, H, L, D] -> the parts of every group, concatenated."""
        out = ()
        for idx, (_, codec) in zip(self.head_index, self.groups):
            out += tuple(codec.encode(x[:, idx], offset=offset))
        return out

    def decode(self, *parts: mx.array, offset: int = 0) -> mx.array:
        """-> x̂ [B, H, L, D]."""
        return in_head_order(self, [codec.decode(*own, offset=offset) for _, codec, own in group_parts(self, parts)])


def group_parts(codec: HeadGroupCodec, parts: tuple[mx.array, ...]) -> list[tuple[mx.array, Any, tuple]]:
    """Split a HeadGroupCodec's parts per group -> [(head index [h], group codec, its parts)]."""
    out, i = [], 0
    for idx, (_, inner), n in zip(codec.head_index, codec.groups, codec.n_parts):
        out.append((idx, inner, tuple(parts[i:i + n])))
        i += n
    return out


def in_head_order(codec: HeadGroupCodec, per_group: list[mx.array]) -> mx.array:
    """Per-group arrays [B, h, ...] (in group order) -> [B, H, ...] in head order."""
    return mx.take(mx.concatenate(per_group, axis=1), codec.inverse, axis=1)


def head_tensors(tensors: dict[str, mx.array], heads: list[int], num_heads: int) -> dict[str, mx.array]:
    """Rows ``heads`` of every per-head tensor (axis 0 of size num_heads); shared ones as they are."""
    idx = mx.array(heads)
    return {k: (t[idx] if t.shape[0] == num_heads else t) for k, t in tensors.items()}


def make_mixed_codecs(module: ModuleType, tensors: dict[str, mx.array], spec: LayerSpec,
                      key_bits: Sequence[int], value_bits: Sequence[int]) -> tuple[HeadGroupCodec, HeadGroupCodec]:
    """(key codec, value codec) of a layer whose heads have widths key_bits [H], value_bits [H];
    tensors: the layer's tensors, ``bits<b>.``-prefixed per width."""
    H = spec.num_kv_heads
    codecs = []
    for which, widths in ((0, key_bits), (1, value_bits)):
        groups = []
        for b in sorted(set(widths)):
            heads = [h for h in range(H) if widths[h] == b]
            prefix = f"bits{b}."
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            sub = width_spec(module, spec, b, heads=len(heads))
            groups.append((heads, module.make_codecs(head_tensors(mine, heads, H), sub)[which]))
        codecs.append(HeadGroupCodec(groups, spec.value_dim if which else spec.head_dim))
    return codecs[0], codecs[1]


# ---------------------------------------------------------------- attention from the codes
# Each group's heads are scored and summed by their own codec's functions, given as ``inner``
# (velox.kernels.reference's dispatch on codec type), and put back in head order. A value
# accumulator holds each head in its own group codec's basis.


def query_basis(codec: HeadGroupCodec, q: mx.array, offset: int, inner: Callable[[Any, mx.array, int], Any]) -> list:
    """q [B, H, n, D] -> each group's query basis, ``inner(group codec, q of its heads, offset)``."""
    return [inner(c, q[:, idx], offset) for idx, (_, c) in zip(codec.head_index, codec.groups)]


def key_scores(codec: HeadGroupCodec, q_basis: list, parts: tuple[mx.array, ...], a: int, b: int,
               inner: Callable[..., mx.array]) -> mx.array:
    """q · x̂ for the coded tokens [a, b) -> [B, H, n, b − a] float32."""
    groups = zip(group_parts(codec, parts), q_basis)
    return in_head_order(codec, [inner(c, qb, own, a, b) for (_, c, own), qb in groups])


def value_sum(codec: HeadGroupCodec, p: mx.array, parts: tuple[mx.array, ...], a: int, b: int,
              inner: Callable[..., mx.array]) -> mx.array:
    """p [B, H, n, b − a] -> each head's value sum over tokens [a, b) in its group codec's basis [B, H, n, D]."""
    return in_head_order(codec, [inner(c, p[:, idx], own, a, b) for idx, c, own in group_parts(codec, parts)])


def value_output(codec: HeadGroupCodec, acc: mx.array, mass: mx.array, inner: Callable[..., mx.array]) -> mx.array:
    """Summed ``value_sum`` acc [B, H, n, D], probability mass [B, H, n, 1] -> Σ p · x̂ [B, H, n, D]."""
    return in_head_order(codec, [inner(c, acc[:, idx], mass[:, idx])
                                 for idx, (_, c) in zip(codec.head_index, codec.groups)])
