"""Launching the fused decode kernels of ``source``: the same grids and tables on every backend.

``FusedDecode(backend, ...)`` compiles ``source.render(name, backend)`` with MLX's custom-kernel
wrapper for that backend (``mx.fast.cuda_kernel`` or ``mx.fast.metal_kernel``, which take the
same arguments) and launches it. ``decode`` runs prep, partial and finish (caches without fp16
regions); ``coded_partial`` runs partial and ``combine`` for ``reference.attend``, which then
merges the fp16 sink/window regions in mx. Only decode (one query token, no mask) with 4-bit
keys and values, head_dim 64 or 128, ≤ 8 query heads per KV head goes here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from . import source
from ..methods.scalar import per_codec, uniform_bits
from .reference import CompressedKV

THREADS = 128  # partial kernel: 4 warps (SIMD groups); the body's NT


# ---------------------------------------------------------------- per-codec device tables


def _dense(x: mx.array) -> mx.array:
    x = mx.contiguous(x.astype(mx.float32))
    mx.eval(x)
    return x


def _levels(codec) -> mx.array:
    """levels [H, D, 16] float32, contiguous (turboquant's are a broadcast view)."""
    return _dense(codec.levels)


def _shared_levels(codec) -> bool:
    """Whether every head and coordinate has the same 16 levels (one lane-replicated table)."""
    lv = np.array(codec.levels.astype(mx.float32))
    return bool(np.all(lv == lv[:1, :1]))


def _mean(codec) -> mx.array:
    """mean [H, D] float32, zeros for codecs without one."""
    return _dense(mx.zeros(codec.scale.shape) if codec.mean is None else codec.mean)


def _tables(codec, name: str):
    build = {"levels": _levels, "shared": _shared_levels, "mean": _mean,
             "scale": lambda c: _dense(c.scale), "rotation": lambda c: _dense(c.rotation),
             "rotation_t": lambda c: _dense(c.rotation_t)}[name]
    return per_codec(codec, f"kernel_{name}", build)  # the same tables serve every backend


@lru_cache(maxsize=None)
def _scalar(value: float) -> mx.array:
    """A float32 [1] device array, made once per value (not a host->device copy per step)."""
    a = mx.array([value], dtype=mx.float32)
    mx.eval(a)
    return a


@lru_cache(maxsize=None)
def _shape_of(n: int) -> mx.array:
    """An array whose only use is its shape[0] = n (a kernel reads the KV-head count from it)."""
    a = mx.zeros((n,), dtype=mx.uint8)
    mx.eval(a)
    return a


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask) with 4-bit K and V codes, head_dim 64 or 128, ≤ 8 query heads per KV head."""
    B, Hq, L, D = queries.shape
    n_kv = kv.key_codec.levels.shape[0]
    return (L == 1 and mask is None and kv.n_coded > 0 and D in (64, 128) and Hq % n_kv == 0
            and Hq // n_kv <= 8 and uniform_bits(kv.key_codec) == 4 and uniform_bits(kv.value_codec) == 4)


# ---------------------------------------------------------------- launches


class FusedDecode:
    """The decode kernels compiled for ``backend``.

    ps_budget: scores held in shared memory per partial block (R·T floats), bounded by the
    backend's shared memory per block; target_blocks: about how many partial blocks fill the GPU.
    """

    def __init__(self, backend: str, ps_budget: int, target_blocks: int):
        self.backend = backend
        self.ps_budget = ps_budget
        self.target_blocks = target_blocks
        self._kernels: dict[str, object] = {}

    def kernel(self, name: str):
        """The compiled-on-first-use kernel ``name`` (prep, partial, combine, finish)."""
        if name not in self._kernels:
            inputs, outputs, _ = source.KERNELS[name]
            header, body = source.render(name, self.backend)
            build = getattr(mx.fast, f"{self.backend}_kernel")  # cuda_kernel / metal_kernel
            self._kernels[name] = build(name=f"velox_decode_{name}", input_names=inputs,
                                        output_names=outputs, source=body, header=header)
        return self._kernels[name]

    def tokens_per_block(self, n: int, groups: int, rep: int) -> int:
        """T: a power of two in [64, ps_budget / R] giving about target_blocks blocks (fewer,
        longer blocks amortise each block's table loads and reductions and keep the merge short)."""
        T = 64
        while T * 2 * rep <= self.ps_budget and -(-n // (T * 2)) * groups >= self.target_blocks:
            T *= 2
        return T

    def _partial(self, q_rot: mx.array, q_mean: mx.array, kv: CompressedKV):
        """Per-split partials: q_rot [B, Hkv, R, D], q_mean [B, Hkv, R] float32 ->
        m, l [B, Hkv, n_split, R], acc [B, Hkv, n_split, R, D]."""
        B, n_kv, R, D = q_rot.shape
        (kw, kn), (vw, vn) = kv.keys, kv.values
        n = kv.n_coded
        T = self.tokens_per_block(n, B * n_kv, R)
        n_split = -(-n // T)
        shared = _tables(kv.key_codec, "shared") and _tables(kv.value_codec, "shared")
        # The kernel reads n from this input's length: a contiguous prefix view, no copy, no launch.
        count = kn.reshape(-1)[:n]
        return self.kernel("partial")(
            inputs=[q_rot, q_mean, kw, kn, vw, vn, _tables(kv.key_codec, "levels"),
                    _tables(kv.value_codec, "levels"), count],
            template=[("R", R), ("W", D // 8), ("T", T), ("WPT", 2 if R <= 4 else 1), ("SHARED", shared)],
            grid=(n_split * THREADS, n_kv, B), threadgroup=(THREADS, 1, 1),
            output_shapes=[(B, n_kv, n_split, R), (B, n_kv, n_split, R), (B, n_kv, n_split, R, D)],
            output_dtypes=[mx.float32] * 3)

    def coded_partial(self, q_rot: mx.array, q_mean: Optional[mx.array], kv: CompressedKV):
        """The coded tokens' partial for ``reference.attend``: q_rot [B, Hkv, R, D] (one query
        token), q_mean [B, Hkv, R, 1] or None -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
        B, n_kv, R, D = q_rot.shape
        qm = mx.zeros((B, n_kv, R), mx.float32) if q_mean is None else q_mean.reshape(B, n_kv, R)
        m, l, acc = self._partial(q_rot.astype(mx.float32), qm, kv)
        return self.kernel("combine")(
            inputs=[m, l, acc], grid=(B * n_kv * R * D, 1, 1), threadgroup=(D, 1, 1),
            output_shapes=[(B, n_kv, R, 1), (B, n_kv, R, 1), (B, n_kv, R, D)], output_dtypes=[mx.float32] * 3)

    def decode(self, queries: mx.array, kv: CompressedKV, scale: float,
               sinks: Optional[mx.array] = None) -> mx.array:
        """Attention of one query token over a cache of coded tokens only (no fp16 regions):
        queries [B, Hq, 1, D] -> [B, Hq, 1, D] in the queries' dtype, in three launches."""
        B, Hq, _, D = queries.shape
        kc, vc = kv.key_codec, kv.value_codec
        n_kv = kc.levels.shape[0]
        R = Hq // n_kv
        n_kv_arr = _shape_of(n_kv)
        q_rot, q_mean = self.kernel("prep")(
            inputs=[queries, _tables(kc, "rotation"), _tables(kc, "scale"), _tables(kc, "mean"),
                    _scalar(scale), n_kv_arr],
            template=[("R", R), ("D", D)], grid=(B * n_kv * R * D, 1, 1), threadgroup=(R * D, 1, 1),
            output_shapes=[(B, n_kv, R, D), (B, n_kv, R)], output_dtypes=[mx.float32] * 2)
        m, l, acc = self._partial(q_rot, q_mean, kv)
        has_sinks = sinks is not None
        return self.kernel("finish")(
            inputs=[m, l, acc, sinks if has_sinks else _scalar(0.0), _tables(vc, "scale"), _tables(vc, "mean"),
                    _tables(vc, "rotation_t"), n_kv_arr],
            template=[("R", R), ("D", D), ("HAS_SINKS", has_sinks), ("OT", queries.dtype)],
            grid=(B * n_kv * R * D, 1, 1), threadgroup=(R * D, 1, 1),
            output_shapes=[queries.shape], output_dtypes=[queries.dtype])[0]
