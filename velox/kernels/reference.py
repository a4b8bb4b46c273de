"""Compressed-domain attention in pure mx: the reference every custom kernel must match.

Attention reads a coded cache without decoding it, through two small tables of plain
functions, one entry per codec type (each method module holds its codec's functions):

- ``KEYS[type]``: ``query_basis(codec, q, offset)`` moves the scaled query into the codec's
  basis once (rotated for ScalarCodec/RVQCodec, sketched for QJLCodec, both for ProdCodec;
  for pre-RoPE keys whose basis commutes with RoPE, PreRopeCodec, rotated too, and each
  block's levels get RoPE at their positions from ``offset`` on);
  ``scores(codec, q', parts, a, b)`` gives q · k̂ for coded tokens [a, b) from their codes
  (no fp16 keys, no per-token D×D rotation);
- ``VALUES[type]``: ``values_sum(codec, p, parts, a, b)`` accumulates p @ v̂ in the codec's
  own basis (rotated, standardised); ``output(codec, acc, mass)`` maps the sum to the model's
  basis once (un-rotation, plus mass × mean).

HeadGroupCodec (RateQuant's per-head widths) dispatches each group of heads to its own
codec's entry. Softmax is computed online in fp32 over blocks of key positions
(flash-attention style), so prefill never holds an [L, S] score matrix, only [L, block].

Positions follow the cache: [sink (fp16) | coded | recent window (fp16)].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Union

import mlx.core as mx

from ..methods import qjl, ratequant, rope, scalar, turboquant_prod, turboquant_rvq
from ..methods.qjl import QJLCodec
from ..methods.ratequant import HeadGroupCodec
from ..methods.rope import PreRopeCodec
from ..methods.scalar import ScalarCodec
from ..methods.turboquant_prod import ProdCodec
from ..methods.turboquant_rvq import RVQCodec

# Score elements per (batch, KV head) held at once: bounds prefill memory to
# [R·L, block] instead of [R·L, S] (R query heads per KV head).
SCORE_BUDGET = 1 << 20
MAX_BLOCK = 1024  # one block's looked-up codes ([block, D] fp32) stay cache-sized at decode

Mask = Union[None, str, mx.array]


@dataclass
class CompressedKV:
    """One layer's cache contents, as attention reads them.

    keys / values: the codecs' parts as the cache allocates them (e.g. words [B, Hkv, N, W]
    uint32, norms [B, Hkv, N] float16) with N ≥ n_coded: only the first n_coded tokens are
    read (kernels take the whole buffers, since a slice would be copied to be contiguous).
    sink / recent: fp16 (keys, values) [B, Hkv, n, D] before / after the coded tokens, or None.
    new: the last coded token's (keys, values) [B, Hkv, 1, D] when they are not in the buffers
    yet (slot n_coded − 1): the GPU decode kernel encodes them on its way (codes only, no
    sink or recent tokens); anything else reading the codes must have them written first.
    """

    key_codec: Any
    value_codec: Any
    keys: Optional[tuple[mx.array, ...]]
    values: Optional[tuple[mx.array, ...]]
    n_coded: int = 0
    sink: Optional[tuple[mx.array, mx.array]] = None
    recent: Optional[tuple[mx.array, mx.array]] = None
    new: Optional[tuple[mx.array, mx.array]] = None

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

    @property
    def n_heads(self) -> int:
        """Hkv, read off the arrays (a HeadGroupCodec's parts hold one group's heads each)."""
        if self.keys is None:
            return (self.sink or self.recent)[0].shape[1]
        return self.key_codec.num_heads if isinstance(self.key_codec, HeadGroupCodec) else self.keys[0].shape[1]


# ---------------------------------------------------------------- codec tables


class KeyOps(NamedTuple):
    """query_basis(codec, q [B, Hkv, n, D] float32, offset) -> q' (what scores takes), once per
    call, offset: the position of coded token 0 (codes of pre-RoPE keys need it);
    scores(codec, q', parts, a, b) -> q · decode(parts)[:, :, a:b]ᵀ [B, Hkv, n, b − a] float32;
    accepts(codec): whether these functions take this codec (default: any of the type)."""

    query_basis: Callable[[Any, mx.array, int], Any]
    scores: Callable[[Any, Any, tuple, int, int], mx.array]
    accepts: Callable[[Any], bool] = lambda codec: True


class ValueOps(NamedTuple):
    """values_sum(codec, p [B, Hkv, n, b − a], parts, a, b) -> [B, Hkv, n, D]: p @ decode(parts)[:, :, a:b]
    in the codec's own basis, linear in p (block sums add up, rescale with the softmax);
    output(codec, acc [B, Hkv, n, D], mass [B, Hkv, n, 1]) -> [B, Hkv, n, D]: the summed acc in the
    model's basis, mass = Σ p over the coded tokens (for affine terms such as a mean)."""

    values_sum: Callable[[Any, mx.array, tuple, int, int], mx.array]
    output: Callable[[Any, mx.array, mx.array], mx.array]


def query_basis(codec: Any, q: mx.array, offset: int = 0) -> Any:
    """The key codec's KeyOps.query_basis: q [B, Hkv, n, D] -> its q' (offset: the position
    of coded token 0)."""
    return KEYS[type(codec)].query_basis(codec, q, offset)


def key_scores(codec: Any, q_basis: Any, parts: tuple, a: int, b: int) -> mx.array:
    """The key codec's KeyOps.scores -> [B, Hkv, n, b − a]."""
    return KEYS[type(codec)].scores(codec, q_basis, parts, a, b)


def value_sum(codec: Any, p: mx.array, parts: tuple, a: int, b: int) -> mx.array:
    """The value codec's ValueOps.values_sum -> [B, Hkv, n, D]."""
    return VALUES[type(codec)].values_sum(codec, p, parts, a, b)


def value_output(codec: Any, acc: mx.array, mass: mx.array) -> mx.array:
    """The value codec's ValueOps.output -> [B, Hkv, n, D]."""
    return VALUES[type(codec)].output(codec, acc, mass)


KEYS: dict[type, KeyOps] = {
    ScalarCodec: KeyOps(scalar.query_basis, scalar.key_scores),
    RVQCodec: KeyOps(turboquant_rvq.query_basis, turboquant_rvq.key_scores),
    QJLCodec: KeyOps(qjl.query_basis, qjl.key_scores),
    ProdCodec: KeyOps(turboquant_prod.query_basis, turboquant_prod.key_scores),
    PreRopeCodec: KeyOps(rope.query_basis, rope.key_scores),
    HeadGroupCodec: KeyOps(partial(ratequant.query_basis, inner=query_basis),
                           partial(ratequant.key_scores, inner=key_scores)),
}

VALUES: dict[type, ValueOps] = {
    ScalarCodec: ValueOps(scalar.value_sum, scalar.value_output),
    RVQCodec: ValueOps(turboquant_rvq.value_sum, turboquant_rvq.value_output),
    HeadGroupCodec: ValueOps(partial(ratequant.value_sum, inner=value_sum),
                             partial(ratequant.value_output, inner=value_output)),
}


def _covered(codec: Any, table: dict) -> bool:
    """Whether ``table`` has the codec's type (for a HeadGroupCodec: every group codec's)."""
    if isinstance(codec, HeadGroupCodec):
        return all(_covered(inner, table) for _, inner in codec.groups)
    ops = table.get(type(codec))
    return ops is not None and getattr(ops, "accepts", lambda c: True)(codec)


def supports(key_codec: Any, value_codec: Any) -> bool:
    """True when the fast path handles this codec pair (KEYS covers the keys, VALUES the values)."""
    return _covered(key_codec, KEYS) and _covered(value_codec, VALUES)


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
    (fp16 regions in the model's basis; coded values as the value codec's ``values_sum``,
    in its own basis) and the probability mass on coded tokens (for ``output``)."""

    m: mx.array      # [B, Hkv, R, L, 1]
    l: mx.array      # [B, Hkv, R, L, 1]
    plain: mx.array  # [B, Hkv, R, L, D]
    coded: mx.array  # [B, Hkv, R, L, D]
    mass: mx.array   # [B, Hkv, R, L, 1]

    def add(self, scores: mx.array) -> mx.array:
        """Fold a block of scores [B, Hkv, R, L, s] in; returns its probabilities (same shape)."""
        m = mx.maximum(self.m, mx.max(scores, axis=-1, keepdims=True))
        alpha = mx.exp(self.m - m)
        p = mx.exp(scores - m)
        self.m = m
        self.l = self.l * alpha + mx.sum(p, axis=-1, keepdims=True)
        self.plain = self.plain * alpha
        self.coded = self.coded * alpha
        self.mass = self.mass * alpha
        return p

    def merge_coded(self, m: mx.array, l: mx.array, acc: mx.array) -> None:
        """Fold in a kernel's partial over the coded tokens: max m, sum l [B, Hkv, R, L, 1],
        value sum acc [B, Hkv, R, L, D] (as ScalarCodec's ``values_sum``, scaled by exp(−m))."""
        self.m, self.l, self.plain, self.coded, self.mass = _merge(
            self.m, self.l, self.plain, self.coded, self.mass, m, l, acc)


@mx.compile
def _merge(m0, l0, plain, coded, mass, m, l, acc):
    # Compiled: on a GPU each of these small ops would otherwise cost a launch per layer and step.
    new = mx.maximum(m0, m)
    alpha, beta = mx.exp(m0 - new), mx.exp(m - new)
    return new, l0 * alpha + l * beta, plain * alpha, coded * alpha + acc * beta, mass * alpha + l * beta


@mx.compile
def _finish(plain, coded, l):
    # A row with every key masked has l = 0: return zeros, not NaN (NaN would leak through p·v = 0·NaN).
    return (plain + coded) / mx.maximum(l, 1e-30)


CodedPartial = Callable[[Any, CompressedKV], tuple[mx.array, mx.array, mx.array]]


def attend(queries: mx.array, kv: CompressedKV, scale: float, mask: Mask = None,
           sinks: Optional[mx.array] = None, block: Optional[int] = None,
           coded_partial: Optional[CodedPartial] = None) -> mx.array:
    """Attention of queries [B, Hq, L, D] over a compressed cache -> [B, Hq, L, D].

    Same semantics as ``mx.fast.scaled_dot_product_attention`` on the decoded keys and
    values: scale multiplies q·k, mask as in ``mask_block``, sinks [Hq] are extra logits
    in the softmax denominator (mlx_lm's attention sinks). Query head h reads KV head
    h // (Hq / Hkv). The codecs must be ones ``supports`` accepts.

    coded_partial: a custom kernel for the coded tokens (no mask): (the key codec's query_basis,
    e.g. ScalarCodec's (q_rot [B, Hkv, R·L, D], q·mean [B, Hkv, R·L, 1] or None), kv) -> (m, l
    [B, Hkv, R·L, 1], acc [B, Hkv, R·L, D]) as ``_Running.merge_coded`` takes them; the fp16
    regions, sinks and output stay here.
    """
    B, Hq, L, D = queries.shape
    kc, vc = kv.key_codec, kv.value_codec
    n_kv = kv.n_heads
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
    run = _Running(m=m0, l=l0, plain=zeros, coded=zeros, mass=mx.zeros_like(l0))

    def plain_segment(k: mx.array, v: mx.array, start: int):
        s = (q @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(*shape5, -1)
        s = apply_mask(s, mask_block(mask, start, start + k.shape[2], L, S, n_kv, rep))
        p = run.add(s)
        run.plain = run.plain + (p.reshape(B, n_kv, rep * L, -1) @ v.astype(mx.float32)).reshape(*shape5, D)

    if kv.sink is not None:
        plain_segment(*kv.sink, 0)

    if kv.n_coded:
        q_key = query_basis(kc, q, kv.n_sink)  # once per call, not per block
        if coded_partial is not None:
            m, l, acc = coded_partial(q_key, kv)
            run.merge_coded(m.reshape(*shape5, 1), l.reshape(*shape5, 1), acc.reshape(*shape5, D))
        else:
            _coded_blocks(run, q_key, kv, mask, block, shape5)

    if kv.recent is not None:
        plain_segment(*kv.recent, kv.n_sink + kv.n_coded)

    flat = (B, n_kv, rep * L)
    coded = value_output(vc, run.coded.reshape(*flat, D), run.mass.reshape(*flat, 1)).reshape(*shape5, D)
    return _finish(run.plain, coded, run.l).reshape(B, Hq, L, D).astype(queries.dtype)


def _coded_blocks(run: _Running, q_key: Any, kv: CompressedKV, mask: Mask, block: int,
                  shape5: tuple[int, int, int, int]) -> None:
    """Fold the coded tokens into ``run``, ``block`` at a time (q_key: the key codec's query_basis)."""
    B, n_kv, rep, L = shape5
    for a in range(0, kv.n_coded, block):
        b = min(a + block, kv.n_coded)
        s = key_scores(kv.key_codec, q_key, kv.keys, a, b).reshape(*shape5, b - a)
        s = apply_mask(s, mask_block(mask, kv.n_sink + a, kv.n_sink + b, L, kv.length, n_kv, rep))
        p = run.add(s)
        acc = value_sum(kv.value_codec, p.reshape(B, n_kv, rep * L, b - a), kv.values, a, b)
        run.coded = run.coded + acc.reshape(run.coded.shape)
        run.mass = run.mass + mx.sum(p, axis=-1, keepdims=True)
        if L > 1 and b < kv.n_coded:
            # Prefill: materialise the running state so this block's [R·L, block] scores are
            # freed before the next block's exist (a lazy graph would keep several alive).
            mx.eval(run.m, run.l, run.plain, run.coded, run.mass)
