"""Launching the kernels of ``source``: the same grids and tables on every backend.

``FusedDecode(backend, ...)`` compiles ``source.render("decode", backend)`` with MLX's
custom-kernel wrapper for that backend (``mx.fast.cuda_kernel`` or ``mx.fast.metal_kernel``,
which take the same arguments) and launches it: ``decode`` for caches of coded tokens only
(query in, attention output out, and the step's new key and value encoded into the buffers
on the way: one launch per layer and step), ``coded_partial`` for ``reference.attend``,
which merges the cache's fp16 sink/window tokens itself. Only decode (one query token, no
mask) with 2- or 4-bit keys and values, head_dim 64 or 128, ≤ 8 query heads per KV head
(≤ 4 with 2-bit codes) goes here. ``append`` encodes a decode step's key and value into the
cache's buffers in place on its own, for a cache read before its decode launch.
"""

from __future__ import annotations

import hashlib
import weakref
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Optional

import mlx.core as mx
import numpy as np

from . import source
from ..methods.scalar import mean_or_zeros, per_codec, uniform_bits
from .reference import CompressedKV

THREADS = 128  # 4 warps (SIMD groups); the body's NT
MERGE_GROUP = 8  # splits per first-level merge (the body's MG): ~1 round trip of loads
BITS = (2, 4)


# ---------------------------------------------------------------- per-codec device tables


class CodecTables(NamedTuple):
    """What the kernel reads of a ScalarCodec, built once per codec (float32, contiguous, on device)."""

    bits: int              # uniform bit width (0: mixed, not dividing 32, levels padded past 2^bits,
                           # or D codes not filling whole words)
    shared: bool           # every head and coordinate has the same levels (one lane-replicated table)
    pair: bool             # shared, 2 or 4 bits, levels exact in fp16: a pair table on tensor cores
    levels: mx.array       # [H, D, 2^bits]
    scale: mx.array        # [H, D]
    mean: mx.array         # [H, D], zeros for codecs without one
    rotation: mx.array     # [H, D, D]
    rotation_t: mx.array   # [H, D, D]
    signs: Optional[mx.array]  # [H, D] when rotation = diag(signs)·H/√D (Sylvester H) for every head


def _dense(x: mx.array) -> mx.array:
    x = mx.contiguous(x.astype(mx.float32))
    mx.eval(x)
    return x


def _hadamard_signs(rotation: np.ndarray) -> Optional[np.ndarray]:
    """signs [H, D] when every head's rotation [D, D] is diag(signs)·H/√D with H the Sylvester
    Hadamard matrix (turboquant's randomized Hadamard): the kernel then rotates with a
    Walsh-Hadamard transform instead of reading the matrix."""
    D = rotation.shape[-1]
    if D & (D - 1):
        return None
    i = np.arange(D)
    popcount = np.vectorize(lambda x: bin(x).count("1"))(i[:, None] & i[None, :])
    hadamard = np.where(popcount % 2, -1.0, 1.0) / np.sqrt(D)  # what the kernel's VX_FWHT computes
    signs = np.sign(rotation[:, :, 0])  # H[:, 0] = 1
    if np.any(signs == 0) or not np.allclose(rotation, signs[:, :, None] * hadamard, atol=1e-5):
        return None
    return signs.astype(np.float32)


def _build_tables(codec) -> CodecTables:
    lv = np.array(codec.levels.astype(mx.float32))
    signs = _hadamard_signs(np.array(codec.rotation.astype(mx.float32)))
    bits, shared = uniform_bits(codec), bool(np.all(lv == lv[:1, :1]))
    if lv.shape[-1] != 1 << bits or lv.shape[1] * bits % 32:
        bits = 0  # every kernel reads levels [H, D, 2^bits] and a token's codes as D·bits/32 whole words
    return CodecTables(bits=bits, shared=shared,
                       pair=shared and bits in BITS and bool(np.all(lv == lv.astype(np.float16))),
                       levels=_dense(codec.levels), scale=_dense(codec.scale),
                       mean=_dense(mean_or_zeros(codec)),
                       rotation=_dense(codec.rotation), rotation_t=_dense(codec.rotation_t),
                       signs=None if signs is None else _dense(mx.array(signs)))


def tables(codec) -> CodecTables:
    """The codec's kernel tables, built on first use (the same tables serve every backend)."""
    return per_codec(codec, "kernel", _build_tables)


@lru_cache(maxsize=None)
def _scalar(value: float) -> mx.array:
    """A float32 [4] device array holding value first, made once per value (not a host->device copy
    per step). Four, not one: MLX's CUDA allocator puts arrays of <= 8 bytes in one managed pool
    that every Python scalar of a step is written into from the CPU."""
    a = mx.array([value] * 4, dtype=mx.float32)
    mx.eval(a)
    return a


def _coords_per_thread(rep: int) -> int:
    return 16 if rep <= 4 else 8  # the query rows (rep × coords) stay in registers


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask) with 2- or 4-bit K and V codes, head_dim 64 or 128, ≤ 8 query
    heads per KV head (≤ 4 with 2-bit codes: a thread's 8 coordinates must fill whole words)."""
    B, Hq, L, D = queries.shape
    n_kv = kv.key_codec.levels.shape[0]
    if not (L == 1 and mask is None and kv.n_coded > 0 and D in (64, 128) and Hq % n_kv == 0 and Hq // n_kv <= 8):
        return False
    cpt = _coords_per_thread(Hq // n_kv)
    return all(b in BITS and cpt * b % 32 == 0 for b in (tables(kv.key_codec).bits, tables(kv.value_codec).bits))


# ---------------------------------------------------------------- launches


class FusedDecode:
    """The decode kernel compiled for ``backend``.

    ps_budget: scores held in shared memory per block (R·T floats), bounded by the backend's
    shared memory per block; target_blocks: about how many blocks fill the GPU; smem_words: the
    block's static shared memory in 4-byte words where the kernel has pair tables (tensor cores:
    CUDA), else 0.
    """

    name_suffix = ""  # subclasses compiling other sources need other kernel names (MLX caches by name)

    def __init__(self, backend: str, ps_budget: int, target_blocks: int, smem_words: int = 0):
        self.backend = backend
        self.ps_budget = ps_budget
        self.target_blocks = target_blocks
        self.smem_words = smem_words
        self._kernels = {}  # template -> compiled kernel
        self._counter = mx.zeros((0,), mx.uint32)  # the merge's counters (see _launch); zero between launches
        self._scratch = mx.zeros((0,), mx.float32)  # the splits' partials (see _launch)
        self._chain = _scalar(0.0)  # the last launch's output: orders launches (shared counter, appends)

    def kernel(self, name: str, template: tuple):
        """Kernel ``name`` ('decode' or 'append') specialised to ``template`` ((name, value)
        pairs), compiled on first use."""
        kernel = self._kernels.get(template)
        if kernel is None:
            kernel = self._kernels[template] = self._compile(name, template)
        return kernel

    def _source(self, name: str) -> tuple[str, str]:
        """(header, body) of kernel ``name`` for this backend (scripts/kernel_variants.py edits it,
        scripts/kernel_timeline.py instruments it)."""
        return source.render(name, self.backend)

    def _outputs(self, name: str) -> list[str]:
        """Kernel ``name``'s output names (scripts/kernel_timeline.py adds one)."""
        return source.KERNELS[name][1]

    def _compile(self, name: str, template: tuple):
        """``source.KERNELS[name]`` with ``template`` baked in, with this backend's wrapper
        (cuda_kernel / metal_kernel: MLX caches compiled kernels by name, hence the digest)."""
        header, body = self._source(name)
        header, body = source.compact(header), source.compact(source.constants(template, self.backend) + body)
        digest = hashlib.sha1(body.encode()).hexdigest()[:16]
        return getattr(mx.fast, f"{self.backend}_kernel")(name=f"velox_{name}{self.name_suffix}_{digest}",
                                                           input_names=source.KERNELS[name][0],
                                                           output_names=self._outputs(name), source=body, header=header)

    def tokens_per_block(self, n: int, groups: int, rep: int, table_words: int = 0) -> int:
        """T: a power of two in [64, ps_budget / R] giving about target_blocks blocks (fewer,
        longer blocks amortise each block's table loads and reductions and keep the merge short);
        table_words: pair tables' words, taken from the scores' room (smem_words)."""
        budget = min(self.ps_budget, self.smem_words - table_words) if table_words else self.ps_budget
        T = 64
        while T * 2 * rep <= budget and -(-n // (T * 2)) * groups >= self.target_blocks:
            T *= 2
        return T

    def _launch(self, q: mx.array, q_mean: mx.array, kv: CompressedKV, R: int, scale: Optional[float],
                finish: bool, sinks: Optional[mx.array], out_dtype: mx.Dtype) -> list[mx.array]:
        """One launch over the coded tokens; q holds the B·Hkv·R query rows [.., D].
        scale: the softmax scale, q raw (the kernel moves it into the key basis), or None: q
        is in the key basis and q_mean [B, Hkv, R] holds q·mean. finish -> [out [B, Hkv·R, 1, D]
        in out_dtype, -], else [acc [B, Hkv, R, D], ml [B, Hkv, 2, R]] (merged value sum, max
        and Σ exp). kv.new (finish only): the kernel encodes it into the buffers first, its own split."""
        (kw, kn), (vw, vn) = kv.keys, kv.values
        B, n_kv, _ = kn.shape
        D = q.shape[-1]
        n = kv.n_coded
        new = 1 if kv.new is not None else 0
        plan = _plan(kv.key_codec, kv.value_codec, R, D, scale, finish, sinks is not None, out_dtype,
                     self.smem_words, kn.dtype if new else None)
        T = self.tokens_per_block(n - new, B * n_kv, R, plan.pair_words)
        template = plan.templates.get(T) or plan.templates.setdefault(
            T, tuple(plan.template + [("T", T), ("PF", min(4, T * D // (_coords_per_thread(R) * THREADS)))]))
        n_split = -(-(n - new) // T) + new
        counters = B * n_kv * (1 + -(-n_split // MERGE_GROUP))  # per (batch, KV head) and per group of splits
        if self._counter.size < counters:
            self._counter = mx.zeros((max(1024, counters),), mx.uint32)
            mx.eval(self._counter)
        partials = -(-B * n_kv * n_split * 2 * R // 4) * 4 + B * n_kv * n_split * R * D  # (max, Σ exp), value sums
        if self._scratch.size < partials:
            self._scratch = mx.zeros((max(1 << 16, 2 * partials),), mx.float32)
            mx.eval(self._scratch)
        out, ml = self.kernel("decode", template)(
            # n reaches the kernel as an input's length: a contiguous prefix view, no host->device copy
            inputs=[q, q_mean, *plan.rotation, kw, kn, vw, vn, *plan.levels, kn[0, 0, :n],
                    plan.dummy if sinks is None else sinks, *plan.finish, *(kv.new or plan.no_new),
                    self._counter, self._scratch, self._chain],
            grid=(n_split * THREADS, n_kv, B), threadgroup=(THREADS, 1, 1),
            output_shapes=[(B, n_kv * R, 1, D) if finish else (B, n_kv, R, D), (4,) if finish else (B, n_kv, 2, R)],
            output_dtypes=plan.output_dtypes)
        self._chain = out
        return [out, ml]

    def coded_partial(self, q_key: tuple[mx.array, Optional[mx.array]], kv: CompressedKV):
        """The coded tokens' merged partial for ``reference.attend``: q_rot [B, Hkv, R, D] (one
        query token, in the key basis), q_mean [B, Hkv, R, 1] or None -> (m, l [B, Hkv, R, 1],
        acc [B, Hkv, R, D]), in one launch."""
        q_rot, q_mean = q_key
        B, n_kv, R, D = q_rot.shape
        qm = mx.zeros((B, n_kv, R), mx.float32) if q_mean is None else q_mean.reshape(B, n_kv, R)
        acc, ml = self._launch(q_rot.astype(mx.float32), qm.astype(mx.float32), kv, R, None, False, None, mx.float32)
        return ml[:, :, 0, :, None], ml[:, :, 1, :, None], acc

    def append(self, keys: mx.array, values: mx.array, key_codec, value_codec,
               key_parts: list[mx.array], value_parts: list[mx.array], slot: int) -> mx.array:
        """Encode keys/values [B, H, 1, D] (``ScalarCodec.encode``) straight into slot ``slot`` of
        the cache buffers key_parts / value_parts ([words [B, H, N, W] uint32, norms [B, H, N]
        float16], N > slot), in place, in one launch. Returns the launch's output [4].

        MLX orders GPU work by the arrays a node outputs, and these writes go to inputs: the
        launch joins the chain (see ``_launch``), so the next decode launch waits for it; any
        other reader of the buffers must first evaluate the returned array."""
        kt, vt = tables(key_codec), tables(value_codec)
        (kw, kn), (vw, vn) = key_parts, value_parts
        B, H, _, D = keys.shape
        template = (("D", D), ("KB", kt.bits), ("VB", vt.bits), ("KHAD", kt.signs is not None),
                    ("VHAD", vt.signs is not None), ("NDT", kn.dtype))
        done = self.kernel("append", template)(
            # the slot reaches the kernel as an input's length (a prefix view, no host->device copy)
            inputs=[keys, values, kt.mean, kt.rotation if kt.signs is None else kt.signs, kt.scale, kt.levels,
                    vt.mean, vt.rotation if vt.signs is None else vt.signs, vt.scale, vt.levels,
                    kw, kn, vw, vn, kn[0, 0, :slot + 1], self._chain],
            grid=(THREADS, H, 2 * B), threadgroup=(THREADS, 1, 1),
            output_shapes=[(4,)], output_dtypes=[mx.float32])[0]  # (4,): see _scalar
        self._chain = done
        return done

    def decode(self, queries: mx.array, kv: CompressedKV, scale: float,
               sinks: Optional[mx.array] = None) -> mx.array:
        """Attention of one query token over a cache of coded tokens only (no fp16 regions):
        queries [B, Hq, 1, D] -> [B, Hq, 1, D] in the queries' dtype, in one launch, which
        first encodes kv.new (if any) into slot n_coded − 1 of the buffers, in place: the
        output orders it (see ``append``)."""
        R = queries.shape[1] // kv.key_codec.levels.shape[0]
        return self._launch(queries, _scalar(0.0), kv, R, scale, True, sinks, queries.dtype)[0]


class LaunchPlan(NamedTuple):
    """A decode launch's arguments that stay the same from step to step (``_plan``)."""

    value_codec: Callable[[], Any]  # a weak reference to the value codec the plan was built for
    rotation: list             # the query's rotation into the key basis (or placeholders)
    levels: list               # key levels, value levels
    finish: list               # the output's rotation back (or placeholders)
    dummy: mx.array            # the placeholder input
    no_new: list               # placeholders for the new key and value
    template: list             # all but T and PF
    templates: dict            # T -> the whole template, a tuple
    pair_words: int            # the pair tables' shared memory words (0: none)
    output_dtypes: list


MIN_SCORES = 2048  # shared-memory words pair tables leave for scores: T >= 512 at 4 query heads


def _pairing(kt: CodecTables, vt: CodecTables, D: int, smem_words: int) -> tuple[bool, bool, bool, int]:
    """(KPAIR, VPAIR, PSAME, the tables' words): pair tables (``CodecTables.pair``) where they
    leave MIN_SCORES of the block's smem_words, the keys' first; PSAME: the values read the keys'."""
    def words(t: CodecTables, pair: bool) -> int:
        k = 1 << t.bits
        return 32 << 2 * t.bits if pair else 32 * k if t.shared else D // 8 * (8 * k + 1)

    same = kt.pair and vt.pair and kt.bits == vt.bits and bool(mx.array_equal(kt.levels[0, 0], vt.levels[0, 0]))
    for kp, vp in ((kt.pair, vt.pair), (kt.pair, False)):
        if kp or vp:
            total = words(kt, kp) + (0 if kp and vp and same else words(vt, vp))
            if total + MIN_SCORES <= smem_words:
                return kp, vp, kp and vp and same, total
    return False, False, False, 0


def _plan(key_codec, value_codec, R: int, D: int, scale: Optional[float], finish: bool,
          has_sinks: bool, out_dtype: mx.Dtype, smem_words: int, new_norms: Optional[mx.Dtype] = None) -> LaunchPlan:
    """The launch plan for these codecs and settings, built once (a decode step's Python cost is
    on the CPU's critical path: rebuilding these lists took ~2 µs of its ~11). new_norms: the
    norms' dtype when the launch encodes a new token (APPEND), else None."""
    plans = per_codec(key_codec, "launch plans", lambda c: {})
    key = (id(value_codec), R, D, scale, finish, has_sinks, out_dtype, smem_words, new_norms)
    plan = plans.get(key)
    if plan is not None and plan.value_codec() is value_codec:  # not a dead codec's id, reused
        return plan
    kt, vt = tables(key_codec), tables(value_codec)
    dummy = _scalar(0.0)
    had = kt.signs is not None and vt.signs is not None
    kpair, vpair, psame, pair_words = _pairing(kt, vt, D, smem_words)
    plan = LaunchPlan(
        value_codec=weakref.ref(value_codec),
        rotation=[kt.signs if had else kt.rotation, kt.scale, kt.mean, _scalar(scale)] if scale else [dummy] * 4,
        levels=[kt.levels, vt.levels],
        finish=[vt.scale, vt.mean, vt.signs if had else vt.rotation_t] if finish else [dummy] * 3,
        dummy=dummy,
        no_new=[dummy, dummy],
        template=[("R", R), ("D", D), ("CPT", _coords_per_thread(R)), ("KB", kt.bits), ("VB", vt.bits),
                  ("KSH", kt.shared), ("VSH", vt.shared), ("KPAIR", kpair), ("VPAIR", vpair), ("PSAME", psame),
                  ("MG", MERGE_GROUP),
                  ("ROTATE", scale is not None), ("HAD", had), ("FINISH", finish),
                  ("HAS_SINKS", has_sinks), ("OT", out_dtype), ("APPEND", new_norms is not None),
                  ("NDT", new_norms or mx.float16)],
        templates={},
        pair_words=pair_words,
        output_dtypes=[out_dtype, mx.float32])
    plans[key] = plan
    return plan


def append_supports(keys: mx.array, key_codec, value_codec) -> bool:
    """``FusedDecode.append`` takes one token (L = 1), head_dim 64 or 128, every code of K and of V
    one width dividing 32."""
    B, H, L, D = keys.shape
    return L == 1 and D in (64, 128) and all(tables(c).bits for c in (key_codec, value_codec))
