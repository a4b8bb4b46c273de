"""Rotated scalar quantization: the encoder/decoder shared by turboquant_mse and spectral.

A vector x (one key or value of one KV head) is centred (optional per-head mean),
split into its norm and direction u = x/‖x‖, rotated (y = u·R, R orthogonal),
standardised per coordinate, and each coordinate is rounded to the nearest level of
its own scalar codebook. Codes are bit-packed into uint32 words with a per-head,
per-coordinate bit width, so a cache holds ``words [B, H, S, W]`` and ``norms [B, H, S]``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np

MAX_BITS = 8


# ---------------------------------------------------------------- codebooks


def lloyd_max(grid: np.ndarray, weight: np.ndarray, bits: int, iters: int = 200) -> np.ndarray:
    """Lloyd-Max levels for a 1-D density sampled on ``grid`` (weights sum to anything).

    Returns ``2**bits`` sorted levels minimising the expected squared error.
    """
    k = 1 << bits
    cdf = np.cumsum(weight) / weight.sum()
    levels = np.interp((np.arange(k) + 0.5) / k, cdf, grid)  # quantile init
    for _ in range(iters):
        edges = (levels[1:] + levels[:-1]) / 2
        cell = np.searchsorted(edges, grid)
        mass = np.bincount(cell, weight, minlength=k)
        moment = np.bincount(cell, weight * grid, minlength=k)
        new = np.where(mass > 0, moment / np.maximum(mass, 1e-300), levels)
        if np.max(np.abs(new - levels)) < 1e-10:
            levels = new
            break
        levels = new
    return levels


@lru_cache(maxsize=None)
def sphere_levels(bits: int, dim: int) -> tuple[float, ...]:
    """Lloyd-Max levels for one coordinate of a random unit vector scaled by sqrt(dim).

    That coordinate t has density ∝ (1 − t²/dim)^((dim−3)/2) on (−√dim, √dim)
    (close to N(0, 1) for large dim): TurboQuant's data-free codebook.
    """
    if bits == 0:
        return (0.0,)
    lim = math.sqrt(dim)
    grid = np.linspace(-lim, lim, 200_001)[1:-1]
    weight = np.power(np.clip(1.0 - grid**2 / dim, 0.0, None), (dim - 3) / 2)
    return tuple(lloyd_max(grid, weight, bits).tolist())


@lru_cache(maxsize=None)
def gaussian_distortion(bits: int) -> float:
    """Mean squared error of the Lloyd-Max quantizer of N(0, 1) at ``bits`` bits."""
    if bits == 0:
        return 1.0
    if bits > 6:  # high-rate regime: each bit divides the error by 4
        return gaussian_distortion(6) * 4.0 ** (6 - bits)
    grid = np.linspace(-8, 8, 160_001)
    weight = np.exp(-grid**2 / 2)
    levels = lloyd_max(grid, weight, bits)
    err = (grid[:, None] - levels[None]) ** 2
    return float((err.min(axis=1) * weight).sum() / weight.sum())


def fit_levels(samples: np.ndarray, bits: int, init: np.ndarray | None = None,
               iters: int = 50) -> np.ndarray:
    """1-D k-means (Lloyd) on data: ``2**bits`` sorted levels for ``samples [N]``."""
    k = 1 << bits
    x = np.sort(samples.astype(np.float64))
    if init is None:
        init = np.quantile(x, (np.arange(k) + 0.5) / k)
    levels = np.sort(np.asarray(init, dtype=np.float64))
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(iters):
        edges = (levels[1:] + levels[:-1]) / 2
        cut = np.concatenate([[0], np.searchsorted(x, edges), [len(x)]])
        count = np.diff(cut)
        total = csum[cut[1:]] - csum[cut[:-1]]
        new = np.where(count > 0, total / np.maximum(count, 1), levels)
        new = np.sort(new)
        if np.max(np.abs(new - levels)) < 1e-7:
            levels = new
            break
        levels = new
    return levels


# ---------------------------------------------------------------- bit packing


@dataclass(frozen=True)
class PackLayout:
    """Where each coordinate's code lives in a vector's uint32 words.

    All arrays are ``[H, D]`` (``in_word``/``in_next``: ``[H, W, D]``): a head may spread its
    bits differently. ``lanes`` [32/b] holds the sub-word shifts when every code has the same
    width b dividing 32 (no code straddles a word), else None.
    """

    words: int
    word: mx.array      # index of the word holding the code's low bits
    shift: mx.array     # bit offset inside that word
    mask: mx.array      # (1 << bits) − 1
    straddle: mx.array  # bool: the code continues into the next word
    in_word: mx.array   # bool [H, W, D]: word w holds the code's low bits
    in_next: mx.array   # bool [H, W, D]: word w holds the high bits of a straddling code
    lanes: Optional[mx.array]

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> "PackLayout":
        bits = np.asarray(bits, dtype=np.int64)
        ends = np.cumsum(bits, axis=-1)
        starts = ends - bits
        words = max(1, int(math.ceil(ends[:, -1].max() / 32)))
        word = starts // 32
        shift = starts % 32
        straddle = (shift + bits > 32)
        w = np.arange(words)[None, :, None]
        b = int(bits.flat[0])
        equal = bool(np.all(bits == b)) and 32 % b == 0
        return cls(
            words=words,
            word=mx.array(word.astype(np.uint32)),
            shift=mx.array(shift.astype(np.uint32)),
            mask=mx.array(((1 << bits) - 1).astype(np.uint32)),
            straddle=mx.array(straddle),
            in_word=mx.array(word[:, None, :] == w),
            in_next=mx.array(straddle[:, None, :] & (word[:, None, :] + 1 == w)),
            lanes=mx.arange(0, 32, b, dtype=mx.uint32) if equal else None,
        )


def shift_into_lanes(codes: mx.array, lanes: mx.array) -> mx.array:
    """codes [..., D] uint32 of one width 32 / len(lanes), D a multiple of len(lanes) ->
    words [..., D / len(lanes)] uint32: each code shifted into its lane, summed."""
    *lead, D = codes.shape
    per_word = lanes.shape[0]
    shifted = mx.left_shift(codes.reshape(*lead, D // per_word, per_word), lanes)
    return mx.sum(shifted, axis=-1).astype(mx.uint32)  # bits are disjoint, so sum == or


def pack(codes: mx.array, layout: PackLayout) -> mx.array:
    """codes [B, H, L, D] uint32 -> words [B, H, L, W] uint32.

    A handful of ops whatever W: each is a kernel launch on a GPU, where a loop over words
    made encoding one token cost more than attending over thousands.
    """
    if layout.lanes is not None:  # equal widths dividing 32: shift each code into its lane
        *lead, D = codes.shape
        per_word = layout.lanes.shape[0]
        if layout.words * per_word != D:
            codes = mx.pad(codes, [(0, 0)] * len(lead) + [(0, layout.words * per_word - D)])
        return shift_into_lanes(codes, layout.lanes)
    shift = layout.shift[:, None, :]
    straddle = layout.straddle[:, None, :]
    lo = mx.left_shift(codes, shift)[..., None, :]  # [B, H, L, 1, D]
    # Shifting by 32 is undefined, so guard the high part with the straddle flag.
    hi = mx.where(straddle, mx.right_shift(codes, mx.where(straddle, 32 - shift, 0)), 0)[..., None, :]
    part = mx.where(layout.in_word[:, None], lo, 0) + mx.where(layout.in_next[:, None], hi, 0)
    return mx.sum(part, axis=-1).astype(mx.uint32)  # [B, H, L, W]


def unpack(words: mx.array, layout: PackLayout) -> mx.array:
    """words [B, H, L, W] uint32 -> codes [B, H, L, D] uint32."""
    B, H, L, _ = words.shape
    D = layout.word.shape[-1]
    if layout.lanes is not None:  # equal widths dividing 32: one shift per lane, no gathers
        per_word = layout.lanes.shape[0]
        codes = mx.right_shift(words[..., None], layout.lanes) & ((1 << (32 // per_word)) - 1)
        return codes.reshape(B, H, L, -1)[..., :D]
    shape = (B, H, L, D)
    idx = mx.broadcast_to(layout.word[:, None, :], shape)
    nxt = mx.minimum(idx + 1, layout.words - 1)
    lo = mx.take_along_axis(words, idx, axis=-1)
    hi = mx.take_along_axis(words, nxt, axis=-1)
    shift = layout.shift[:, None, :]
    straddle = layout.straddle[:, None, :]
    codes = mx.right_shift(lo, shift)
    codes = codes | mx.where(straddle, mx.left_shift(hi, mx.where(straddle, 32 - shift, 0)), 0)
    return codes & layout.mask[:, None, :]


@lru_cache(maxsize=None)
def chunk_table(levels: tuple[float, ...], bits: int) -> mx.array:
    """Levels of every chunk of ``bits``-bit codes that share one codebook ``levels``:
    [2^16, 16/b] for b = 1, 2, 4 (16-bit chunks), [256, 1] for b = 8 (bytes).

    One gather per chunk then replaces the unpack and a gather per code, the CPU backend's
    slowest ops; one table per codebook serves every codec (and layer) that uses it.
    """
    if bits == 8:
        return mx.array(np.array(levels, np.float32)[:, None])
    chunk = np.arange(1 << 16)
    lv = np.array(levels, np.float32)
    return mx.array(np.stack([lv[(chunk >> (bits * j)) & ((1 << bits) - 1)] for j in range(16 // bits)], axis=-1))


def table_levels(words: mx.array, table: mx.array, n: int) -> mx.array:
    """words [..., W] uint32 -> the levels [..., n] float32 of their first n codes (``chunk_table``;
    the codes start at bit 0 of words[..., 0])."""
    # Little-endian words: chunk i of a word holds its codes i·(16/b) … in order.
    y = mx.take(table, words.view(mx.uint8 if table.shape[0] == 256 else mx.uint16), axis=0)
    return y.reshape(*words.shape[:-1], -1)[..., :n]


@lru_cache(maxsize=None)
def sign_layout(n: int) -> PackLayout:
    """Layout of n one-bit codes, shared by every head (its [1, n] arrays broadcast over H)."""
    return PackLayout.from_bits(np.ones((1, n), dtype=np.int64))


def pack_signs(y: mx.array) -> mx.array:
    """y [B, H, L, n] -> sign bits (1 where y > 0) as words [B, H, L, ceil(n/32)] uint32."""
    return pack((y > 0).astype(mx.uint32), sign_layout(y.shape[-1]))


def unpack_signs(words: mx.array, n: int) -> mx.array:
    """words [B, H, L, W] -> ±1.0 [B, H, L, n] float32."""
    return table_levels(words, chunk_table((-1.0, 1.0), 1), n)


def level_codes(y: mx.array, levels: mx.array) -> mx.array:
    """Index of the nearest of sorted ``levels [K]`` for every element of y -> uint32, y's shape."""
    mids = (levels[1:] + levels[:-1]) / 2
    return mx.sum(y[..., None] > mids, axis=-1).astype(mx.uint32)


# ---------------------------------------------------------------- the codec


def _standardise(x: mx.array, mean: mx.array, rotation: mx.array, scale: mx.array) -> tuple[mx.array, mx.array]:
    """x [B, H, L, D] -> (rotated unit vectors / scale [B, H, L, D], norms [B, H, L, 1]) float32."""
    x = x.astype(mx.float32) - mean[:, None, :]
    norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
    return (x / mx.maximum(norm, 1e-20)) @ rotation / scale[:, None, :], norm


def _codes(y: mx.array, boundaries: mx.array) -> mx.array:
    """y [B, H, L, D] -> codes uint32: how many of the coordinate's boundaries [H, D, K−1] y exceeds."""
    return mx.sum(y[..., None] > boundaries[:, None], axis=-1).astype(mx.uint32)


@mx.compile
def _encode_lanes(x: mx.array, mean: mx.array, rotation: mx.array, scale: mx.array, boundaries: mx.array,
                  lanes: mx.array) -> tuple[mx.array, mx.array]:
    """ScalarCodec.encode when every code has the width 32 / len(lanes) and D fills whole words."""
    y, norm = _standardise(x, mean, rotation, scale)
    return shift_into_lanes(_codes(y, boundaries), lanes), norm[..., 0].astype(mx.float16)


@dataclass
class ScalarCodec:
    """Encoder/decoder for one of K or V of one layer.

    rotation [H, D, D] orthogonal (y = u @ rotation); mean [H, D] or None;
    scale [H, D] (coordinate std in y units); levels [H, D, K] sorted standardised
    levels (padded by repeating the last); bits [H, D].
    """

    rotation: mx.array
    scale: mx.array
    levels: mx.array
    bits: np.ndarray
    mean: mx.array | None = None

    def __post_init__(self):
        H, D, K = self.levels.shape
        self.layout = PackLayout.from_bits(self.bits)
        self.rotation_t = mx.swapaxes(self.rotation, -1, -2)
        mids = (self.levels[..., 1:] + self.levels[..., :-1]) / 2
        # Padded levels repeat, so their midpoints equal a level: push them out of reach.
        pad = mx.arange(1, K)[None, None, :] >= mx.array(1 << self.bits.astype(np.int64))[..., None]
        self.boundaries = mx.where(pad, mx.inf, mids)
        base = (mx.arange(H)[:, None] * D + mx.arange(D)[None, :]) * K
        self.flat_base = base.astype(mx.uint32)[:, None, :]
        self.flat_levels = self.levels.reshape(-1)

    @property
    def bits_per_vector(self) -> int:
        """Code bits per vector (excluding the fp16 norm), the same for every head."""
        return int(self.bits.sum(axis=-1).max())

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
        """x [B, H, L, D] -> (words [B, H, L, W] uint32, norms [B, H, L] float16).

        offset (the position of x's first token) is unused: this codec is position-free.
        """
        lanes = self.layout.lanes
        mean = mean_or_zeros(self)
        if lanes is not None and self.layout.words * lanes.shape[0] == x.shape[-1]:
            # one compiled graph: a decode step encodes one token per layer, and each op it
            # saves is a kernel launch on a GPU (x − 0 and the lane sum are the same bits)
            return _encode_lanes(x, mean, self.rotation, self.scale, self.boundaries, lanes)
        y, norm = _standardise(x, mean, self.rotation, self.scale)
        return pack(_codes(y, self.boundaries), self.layout), norm[..., 0].astype(mx.float16)

    def decode(self, words: mx.array, norms: mx.array, offset: int = 0) -> mx.array:
        """(words [B, H, L, W], norms [B, H, L]) -> x̂ [B, H, L, D] float32."""
        codes = unpack(words, self.layout)
        y = mx.take(self.flat_levels, self.flat_base + codes) * self.scale[:, None, :]
        x = (y @ self.rotation_t) * norms[..., None].astype(mx.float32)
        if self.mean is not None:
            x = x + self.mean[:, None, :]
        return x


# ---------------------------------------------------------------- attention from the codes
#
# ScalarCodec's functions for velox.kernels.reference. A coded vector decodes as
# x̂ = norm · (levels[code] · scale) @ Rᵀ (+ mean), so
#     q · x̂ = norm · ((q @ R) · scale) · levels[code]  (+ q · mean):
# the query is rotated once and scored against looked-up levels (no D×D rotation per
# token), and values are summed in the standardised rotated basis and un-rotated once.

_PER_CODEC: dict[tuple[int, str], Any] = {}


def per_codec(codec: Any, name: str, build: Callable[[Any], Any]) -> Any:
    """``build(codec)``, computed once per codec object (and dropped with it): tables that
    every decode step would otherwise rebuild."""
    key = (id(codec), name)
    if key not in _PER_CODEC:
        _PER_CODEC[key] = build(codec)
        weakref.finalize(codec, _PER_CODEC.pop, key, None)
    return _PER_CODEC[key]


def mean_or_zeros(codec: ScalarCodec) -> mx.array:
    """The codec's mean [H, D] float32, zeros when it has none (built once per codec): one
    graph serves codecs with and without a mean, and x − 0 changes no bit."""
    return per_codec(codec, "mean", lambda c: mx.zeros(c.scale.shape) if c.mean is None else c.mean.astype(mx.float32))


def uniform_bits(codec: ScalarCodec) -> int:
    """The codec's bit width when every coordinate of every head has it and it divides 32, else 0."""
    b = int(codec.bits.flat[0])
    return b if 32 % b == 0 and np.all(codec.bits == b) else 0


def shared_table(codec: ScalarCodec) -> Optional[mx.array]:
    """The codec's ``chunk_table`` when all heads and coordinates share one codebook of
    b = 1, 2, 4 or 8 bits (turboquant), else None (general unpack and per-coordinate gather)."""
    return per_codec(codec, "table", _build_shared_table)


def _build_shared_table(codec: ScalarCodec) -> Optional[mx.array]:
    b = uniform_bits(codec)
    if b not in (1, 2, 4, 8):
        return None
    levels = np.array(codec.levels[..., : 1 << b].astype(mx.float32))
    if not np.all(levels == levels[:1, :1]):
        return None
    return chunk_table(tuple(levels[0, 0].tolist()), b)


def code_levels(words: mx.array, codec: ScalarCodec) -> mx.array:
    """words [B, H, N, W] -> levels[code] [B, H, N, D] float32: the coded vectors in the
    codec's rotated basis, standardised (times ``codec.scale`` to undo, then norm)."""
    table = shared_table(codec)
    if table is not None:
        return table_levels(words, table, codec.levels.shape[1])
    return mx.take(codec.flat_levels, codec.flat_base + unpack(words, codec.layout)).astype(mx.float32)


def query_basis(codec: ScalarCodec, q: mx.array, offset: int = 0) -> tuple[mx.array, Optional[mx.array]]:
    """q [B, H, n, D] float32 -> (q_rot = (q @ R) · scale [B, H, n, D], q · mean [B, H, n, 1] or None).
    offset (the first coded token's position) is unused: this codec is position-free."""
    q_rot = (q @ codec.rotation.astype(mx.float32)) * codec.scale[None, :, None, :]
    q_mean = None if codec.mean is None else q @ codec.mean[:, :, None].astype(mx.float32)
    return q_rot, q_mean


def key_scores(codec: ScalarCodec, q_basis: tuple[mx.array, Optional[mx.array]],
               parts: tuple[mx.array, mx.array], a: int, b: int) -> mx.array:
    """q · x̂ for the coded tokens [a, b) of parts (words, norms) -> [B, H, n, b − a] float32."""
    q_rot, q_mean = q_basis
    words, norms = parts
    y = code_levels(words[:, :, a:b], codec)
    s = (q_rot @ y.swapaxes(-1, -2)) * norms[:, :, None, a:b].astype(mx.float32)
    return s if q_mean is None else s + q_mean


def value_sum(codec: ScalarCodec, p: mx.array, parts: tuple[mx.array, mx.array], a: int, b: int) -> mx.array:
    """p [B, H, n, b − a] -> Σ p · norm · levels[code] [B, H, n, D]: p @ x̂ over tokens [a, b)
    in the standardised rotated basis, without the mean (``value_output`` adds it)."""
    words, norms = parts
    return (p * norms[:, :, None, a:b].astype(mx.float32)) @ code_levels(words[:, :, a:b], codec)


def value_output(codec: ScalarCodec, acc: mx.array, mass: mx.array) -> mx.array:
    """Summed ``value_sum`` acc [B, H, n, D] and probability mass [B, H, n, 1] -> Σ p · x̂ [B, H, n, D]."""
    return _unrotate(acc, mass, codec.scale, codec.rotation_t, mean_or_zeros(codec))


@mx.compile
def _unrotate(acc, mass, scale, rotation_t, mean):
    # Compiled: on a GPU each small op would otherwise cost a launch per layer and step.
    return (acc * scale[:, None, :]) @ rotation_t + mass * mean[:, None, :]
