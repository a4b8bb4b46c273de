"""Compressed-domain attention in pure mx: the reference every custom kernel must match.

For caches whose key and value codecs are ``ScalarCodec`` (turboquant_mse keys and values).
A coded vector decodes as x̂ = norm · (levels[code] · scale) @ Rᵀ (+ mean), so

    q · x̂ = norm · (q @ R) · (levels[code] · scale)  (+ q · mean)

The query is rotated once into the key codec's basis and scored against the unpacked
codes directly: no per-token D×D rotation, no fp16 keys. Values are summed in their
codec's rotated basis and the output is un-rotated once (@ Rᵀ). Softmax is computed
online in fp32 over blocks of key positions (flash-attention style), so prefill never
holds an [L, S] score matrix, only [L, block].

Positions follow the cache: [sink (fp16) | coded | recent window (fp16)].
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import numpy as np

from ..methods.scalar import ScalarCodec, unpack

# Score elements per (batch, KV head) held at once: bounds prefill memory to
# [R·L, block] instead of [R·L, S] (R query heads per KV head).
SCORE_BUDGET = 1 << 20
MAX_BLOCK = 1024  # one block's looked-up codes ([block, D] fp32) stay cache-sized at decode

Mask = Union[None, str, mx.array]


@dataclass
class CompressedKV:
    """One layer's cache contents, as attention reads them.

    keys / values: the codecs' parts as the cache allocates them, (words [B, Hkv, N, W]
    uint32, norms [B, Hkv, N] float16) with N ≥ n_coded: only the first n_coded tokens
    are read (kernels take the whole buffers, since a slice would be copied to be
    contiguous). sink / recent: fp16 (keys, values) [B, Hkv, n, D] before / after the
    coded tokens, or None.
    """

    key_codec: ScalarCodec
    value_codec: ScalarCodec
    keys: Optional[tuple[mx.array, mx.array]]
    values: Optional[tuple[mx.array, mx.array]]
    n_coded: int = 0
    sink: Optional[tuple[mx.array, mx.array]] = None
    recent: Optional[tuple[mx.array, mx.array]] = None

    @property
    def n_sink(self) -> int:
        return 0 if self.sink is None else self.sink[0].shape[2]

    @property
    def coded_nbytes(self) -> int:
        """Bytes of codes and norms attention reads (the coded tokens only)."""
        parts = (self.keys or ()) + (self.values or ())
        return sum(p.nbytes // p.shape[2] * self.n_coded for p in parts)

    @property
    def n_recent(self) -> int:
        return 0 if self.recent is None else self.recent[0].shape[2]

    @property
    def length(self) -> int:
        return self.n_sink + self.n_coded + self.n_recent


def supports(key_codec, value_codec) -> bool:
    """True when the fast path handles this codec pair (plain ScalarCodec for K and V)."""
    return type(key_codec) is ScalarCodec and type(value_codec) is ScalarCodec


# ---------------------------------------------------------------- codes -> standardised levels


def uniform_bits(codec: ScalarCodec) -> int:
    """The codec's bit width when every coordinate of every head has it and it divides 32, else 0."""
    b = int(codec.bits.flat[0])
    return b if 32 % b == 0 and np.all(codec.bits == b) else 0


def unpack_codes(words: mx.array, codec: ScalarCodec) -> mx.array:
    """words [B, H, N, W] -> codes [B, H, N, D] uint32.

    Equal widths that divide 32 never straddle words: one shift per sub-word, which is
    much cheaper than the general layout's two gathers.
    """
    b = uniform_bits(codec)
    if not b:
        return unpack(words, codec.layout)
    D = codec.levels.shape[1]
    per_word = 32 // b
    shifts = mx.arange(0, 32, b, dtype=mx.uint32)
    codes = mx.right_shift(words[..., None], shifts) & ((1 << b) - 1)
    B, H, N, W = words.shape
    return codes.reshape(B, H, N, W * per_word)[..., :D]


@dataclass(frozen=True)
class Lookup:
    """How to turn a codec's packed words into standardised levels (before scale and norm).

    table: [2^16, 16/b] levels of every 16-bit chunk of b-bit codes (b = 1, 2, 4), or
    [256, 1] for 8 bits, when all heads and coordinates share one codebook (turboquant):
    one gather per 16-bit chunk replaces the unpack and one gather per code, the CPU
    backend's slowest ops. None otherwise (general unpack + per-(head, coordinate) gather).
    """

    table: Optional[mx.array]
    chunk: Optional[mx.Dtype]


_PER_CODEC: dict[tuple[int, str], Any] = {}


def per_codec(codec: ScalarCodec, name: str, build: Callable[[ScalarCodec], Any]) -> Any:
    """``build(codec)``, computed once per codec object (and dropped with it): tables that
    every decode step would otherwise rebuild."""
    key = (id(codec), name)
    if key not in _PER_CODEC:
        _PER_CODEC[key] = build(codec)
        weakref.finalize(codec, _PER_CODEC.pop, key, None)
    return _PER_CODEC[key]


def lookup(codec: ScalarCodec) -> Lookup:
    """The codec's Lookup."""
    return per_codec(codec, "lookup", _build_lookup)


def _build_lookup(codec: ScalarCodec) -> Lookup:
    b = uniform_bits(codec)
    if b not in (1, 2, 4, 8):
        return Lookup(None, None)
    levels = np.array(codec.levels[..., : 1 << b].astype(mx.float32))
    if not np.all(levels == levels[:1, :1]):
        return Lookup(None, None)
    shared = levels[0, 0]
    if b == 8:
        return Lookup(mx.array(shared[:, None]), mx.uint8)
    chunk = np.arange(1 << 16)
    table = np.stack([shared[(chunk >> (b * j)) & ((1 << b) - 1)] for j in range(16 // b)], axis=-1)
    return Lookup(mx.array(table), mx.uint16)


def code_levels(words: mx.array, codec: ScalarCodec) -> mx.array:
    """words [B, H, N, W] -> levels[code] [B, H, N, D] float32: the coded vectors in the
    codec's rotated basis, standardised (times ``codec.scale`` to undo, then norm)."""
    D = codec.levels.shape[1]
    lk = lookup(codec)
    if lk.table is not None:
        # Little-endian words: chunk i of a word holds its codes i·(16/b) … in order.
        chunks = words.view(lk.chunk)
        y = mx.take(lk.table, chunks, axis=0)  # [B, H, N, n_chunks, 16/b]
        return y.reshape(*words.shape[:3], -1)[..., :D]
    return mx.take(codec.flat_levels, codec.flat_base + unpack_codes(words, codec)).astype(mx.float32)


# ---------------------------------------------------------------- masks


def mask_block(mask: Mask, start: int, stop: int, L: int, S: int, n_kv: int, rep: int) -> Optional[mx.array]:
    """Key positions [start, stop) of an sdpa mask, broadcastable to scores [B, Hkv, R, L, stop-start].

    mask: None, "causal" (query i sits at position S − L + i, as in mlx_lm), or an array
    broadcastable to [B, Hq, L, S] (bool: keep where True; else added to the scores).
    """
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}")
        q_pos = mx.arange(S - L, S)[:, None]
        if S - L >= stop - 1:  # every query sees the whole block
            return None
        return q_pos >= mx.arange(start, stop)[None]
    m = mask[..., start:stop]
    if m.ndim >= 3 and m.shape[-3] > 1:  # one mask per query head: group them per KV head
        return m.reshape(*m.shape[:-3], n_kv, rep, *m.shape[-2:])
    return m[..., None, :, :] if m.ndim >= 3 else m


def apply_mask(scores: mx.array, m: Optional[mx.array]) -> mx.array:
    if m is None:
        return scores
    if m.dtype == mx.bool_:
        return mx.where(m, scores, -mx.inf)
    return scores + m.astype(scores.dtype)


# ---------------------------------------------------------------- online softmax


@dataclass
class _Running:
    """Flash-attention running state per query row: max, denominator, two accumulators
    (fp16 regions in the model's basis; coded values as Σ p·norm·levels[code] in the value
    codec's standardised basis) and the probability mass on coded tokens (for the mean)."""

    m: mx.array        # [B, Hkv, R, L, 1]
    l: mx.array        # [B, Hkv, R, L, 1]
    plain: mx.array    # [B, Hkv, R, L, D]
    rotated: mx.array  # [B, Hkv, R, L, D]
    mass: mx.array     # [B, Hkv, R, L, 1]

    def add(self, scores: mx.array) -> mx.array:
        """Fold a block of scores [B, Hkv, R, L, s] in; returns its probabilities (same shape)."""
        m = mx.maximum(self.m, mx.max(scores, axis=-1, keepdims=True))
        alpha = mx.exp(self.m - m)
        p = mx.exp(scores - m)
        self.m = m
        self.l = self.l * alpha + mx.sum(p, axis=-1, keepdims=True)
        self.plain = self.plain * alpha
        self.rotated = self.rotated * alpha
        self.mass = self.mass * alpha
        return p

    def merge_coded(self, m: mx.array, l: mx.array, acc: mx.array) -> None:
        """Fold in a kernel's partial over the coded tokens: max m, sum l [B, Hkv, R, L, 1],
        value sum acc [B, Hkv, R, L, D] (standardised basis, scaled by exp(−m))."""
        self.m, self.l, self.plain, self.rotated, self.mass = _merge(
            self.m, self.l, self.plain, self.rotated, self.mass, m, l, acc)


@mx.compile
def _merge(m0, l0, plain, rotated, mass, m, l, acc):
    # Compiled: on a GPU each of these small ops would otherwise cost a launch per layer and step.
    new = mx.maximum(m0, m)
    alpha, beta = mx.exp(m0 - new), mx.exp(m - new)
    return new, l0 * alpha + l * beta, plain * alpha, rotated * alpha + acc * beta, mass * alpha + l * beta


@mx.compile
def _finish(plain, rotated, mass, l, scale, rotation_t, mean):
    """Output [B, Hkv, R, L, D] from the running state: un-scale and un-rotate the coded value
    sum once (@ Rᵀ per KV head), add the mean, divide by the softmax denominator."""
    B, n_kv, R, L, D = rotated.shape
    rotated = (rotated * scale[None, :, None, None, :]).reshape(B, n_kv, R * L, D)
    out = plain + (rotated @ rotation_t).reshape(B, n_kv, R, L, D) + mass * mean[None, :, None, None, :]
    # A row with every key masked has l = 0: return zeros, not NaN (NaN would leak through p·v = 0·NaN).
    return out / mx.maximum(l, 1e-30)


CodedPartial = Callable[[mx.array, Optional[mx.array], CompressedKV], tuple[mx.array, mx.array, mx.array]]


def attend(queries: mx.array, kv: CompressedKV, scale: float, mask: Mask = None,
           sinks: Optional[mx.array] = None, block: Optional[int] = None,
           coded_partial: Optional[CodedPartial] = None) -> mx.array:
    """Attention of queries [B, Hq, L, D] over a compressed cache -> [B, Hq, L, D].

    Same semantics as ``mx.fast.scaled_dot_product_attention`` on the decoded keys and
    values: scale multiplies q·k, mask as in ``mask_block``, sinks [Hq] are extra logits
    in the softmax denominator (mlx_lm's attention sinks). Query head h reads KV head
    h // (Hq / Hkv).

    coded_partial: a custom kernel for the coded tokens (no mask): (q_rot [B, Hkv, R·L, D],
    q·mean [B, Hkv, R·L, 1] or None, kv) -> (m, l [B, Hkv, R·L, 1], acc [B, Hkv, R·L, D]) as
    ``_Running.merge_coded`` takes them; the fp16 regions, sinks and output stay here.
    """
    B, Hq, L, D = queries.shape
    kc, vc = kv.key_codec, kv.value_codec
    n_kv = kc.levels.shape[0]
    rep = Hq // n_kv
    S = kv.length
    if block is None:
        block = max(64, min(MAX_BLOCK, SCORE_BUDGET // (rep * L)))

    q = queries.astype(mx.float32).reshape(B, n_kv, rep * L, D) * scale
    shape5 = (B, n_kv, rep, L)
    if sinks is None:  # a finite floor: a fully masked block never gives exp(-inf - -inf)
        m0, l0 = mx.full((*shape5, 1), mx.finfo(mx.float32).min, mx.float32), mx.zeros((*shape5, 1), mx.float32)
    else:  # a sink logit is a key with no value: start the max and the sum there
        m0 = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, n_kv, rep, 1, 1), (*shape5, 1))
        l0 = mx.ones((*shape5, 1), mx.float32)
    zeros = mx.zeros((*shape5, D), mx.float32)
    run = _Running(m=m0, l=l0, plain=zeros, rotated=zeros, mass=mx.zeros_like(l0))

    def plain_segment(k: mx.array, v: mx.array, start: int):
        s = (q @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(*shape5, -1)
        s = apply_mask(s, mask_block(mask, start, start + k.shape[2], L, S, n_kv, rep))
        p = run.add(s)
        run.plain = run.plain + (p.reshape(B, n_kv, rep * L, -1) @ v.astype(mx.float32)).reshape(*shape5, D)

    if kv.sink is not None:
        plain_segment(*kv.sink, 0)

    if kv.n_coded:
        # The query in the key codec's standardised basis: q·x̂ = norm · q_rot·levels[code] (+ q·mean).
        q_rot = (q @ kc.rotation.astype(mx.float32)) * kc.scale[None, :, None, :]  # [B, Hkv, R·L, D]
        q_mean = None if kc.mean is None else q @ kc.mean[:, :, None].astype(mx.float32)  # [B, Hkv, R·L, 1]
        if coded_partial is not None:
            m, l, acc = coded_partial(q_rot, q_mean, kv)
            run.merge_coded(m.reshape(*shape5, 1), l.reshape(*shape5, 1), acc.reshape(*shape5, D))
        else:
            _coded_blocks(run, q_rot, q_mean, kv, mask, block, shape5)

    if kv.recent is not None:
        plain_segment(*kv.recent, kv.n_sink + kv.n_coded)

    mean = per_codec(vc, "mean", lambda c: mx.zeros(c.scale.shape) if c.mean is None else c.mean.astype(mx.float32))
    out = _finish(run.plain, run.rotated, run.mass, run.l, vc.scale, vc.rotation_t, mean)
    return out.reshape(B, Hq, L, D).astype(queries.dtype)


def _coded_blocks(run: _Running, q_rot: mx.array, q_mean: Optional[mx.array], kv: CompressedKV,
                  mask: Mask, block: int, shape5: tuple[int, int, int, int]) -> None:
    """Fold the coded tokens into ``run``, ``block`` at a time (q_rot, q_mean as in ``attend``)."""
    B, n_kv, rep, L = shape5
    kc, vc = kv.key_codec, kv.value_codec
    (k_words, k_norms), (v_words, v_norms) = kv.keys, kv.values
    for a in range(0, kv.n_coded, block):
        b = min(a + block, kv.n_coded)
        y = code_levels(k_words[:, :, a:b], kc)
        s = (q_rot @ y.swapaxes(-1, -2)) * k_norms[:, :, None, a:b].astype(mx.float32)
        if q_mean is not None:
            s = s + q_mean
        s = apply_mask(s.reshape(*shape5, b - a), mask_block(mask, kv.n_sink + a, kv.n_sink + b, L, kv.length, n_kv, rep))
        p = run.add(s)
        w = p.reshape(B, n_kv, rep * L, b - a) * v_norms[:, :, None, a:b].astype(mx.float32)
        run.rotated = run.rotated + (w @ code_levels(v_words[:, :, a:b], vc)).reshape(*shape5, -1)
        if vc.mean is not None:
            run.mass = run.mass + mx.sum(p, axis=-1, keepdims=True)
        if L > 1 and b < kv.n_coded:
            # Prefill: materialise the running state so this block's [R·L, block] scores are
            # freed before the next block's exist (a lazy graph would keep several alive).
            mx.eval(run.m, run.l, run.plain, run.rotated, run.mass)
