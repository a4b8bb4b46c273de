"""Fused decode attention over 4-bit ScalarCodec codes, as ``mx.fast.cuda_kernel``s.

Three kernels, launched back to back (each extra mx op costs a launch per layer and step,
which at decode is worth as much as the kernel itself):

1. ``prep``: one block per (batch, KV head) rotates the group's R query heads into the key
   codec's basis once: q' = scale · (q @ R_k) · s_k, and q·mean_k.
2. ``partial``: one block per (batch, KV head, split of T coded tokens), every query head of
   the group (GQA: codes are read once for R heads), three passes over shared memory:
   scores (each thread unpacks WPT uint32 words = 8·WPT codes of a token, looks the levels
   up and reduces across the token's lanes by shuffles; × fp16 norm + q·mean), the block's
   softmax statistics (one warp per query head), then Σ p·norm·levels[code] per coordinate
   in registers, reduced across token lanes. Writes a flash-decoding partial
   (max, Σ exp, value sum in the value codec's standardised basis).
3. ``finish``: one block per (batch, KV head) merges the splits (and the attention-sink
   logits), scales by s_v, un-rotates once (@ R_vᵀ), adds the value mean, divides by the
   softmax denominator and writes the output in the queries' dtype.

``decode`` runs all three (caches without fp16 regions); ``coded_partial`` runs 2 and a
``combine`` (the same merge as 3, no output) for ``reference.attend``, which then merges
the fp16 sink/window regions in mx. Only decode (one query token, no mask) with 4-bit keys
and values, head_dim 64 or 128, ≤ 8 query heads per KV head goes here.

Level lookups: when every coordinate of every head shares one codebook (turboquant), each
lane reads its own copy of the 16 levels (table[code·32 + lane]): shared-memory gathers with
random codes would otherwise collide on banks. Per-coordinate codebooks use a padded
[word][8·16] table.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from .reference import CompressedKV, per_codec, uniform_bits

THREADS = 128  # partial kernel: 4 warps
PS_BUDGET = 4096  # scores held in shared memory per block (R·T floats)
TARGET_BLOCKS = 528  # ~4 blocks per SM of an H100 (132 SMs)

HEADER = r"""
// Explicit conversions: the implicit __half/__nv_bfloat16 ones may be compiled out.
__device__ inline float vx_to_float(float x) { return x; }
__device__ inline float vx_to_float(__half x) { return __half2float(x); }
__device__ inline float vx_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T vx_from_float(float x);
template <> __device__ inline float vx_from_float<float>(float x) { return x; }
template <> __device__ inline __half vx_from_float<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 vx_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Merge one (batch·KV head, query head r) row's split partials, flash-decoding style.
// m_in/l_in [n_split, R] and acc_in [n_split, R, D] start at this (batch, KV head).
__device__ inline void vx_merge_splits(const float* m_in, const float* l_in, const float* acc_in,
                                    int n_split, int R, int D, int r, int d,
                                    float& top, float& l, float& acc) {
    top = m_in[r];
    for (int s = 1; s < n_split; s++) top = fmaxf(top, m_in[s * R + r]);
    l = 0.f;
    acc = 0.f;
    for (int s = 0; s < n_split; s++) {
        const float w = __expf(m_in[s * R + r] - top);
        l += l_in[s * R + r] * w;
        acc += acc_in[(s * R + r) * D + d] * w;
    }
}
"""

PREP = r"""
    // One block per (b, h), R·D threads: thread (r, d) -> q'[r, d]; threads d = 0 also q·mean.
    __shared__ float qs[R * D];
    const int bh = blockIdx.x;
    const int h = bh % n_kv_arr_shape[0];
    const int r = threadIdx.x / D, d = threadIdx.x % D;
    qs[threadIdx.x] = vx_to_float(queries[(size_t)bh * R * D + threadIdx.x]);
    __syncthreads();
    const float* rot_h = rot + (size_t)h * D * D;
    float s = 0.f;
    for (int k = 0; k < D; k++) s += qs[r * D + k] * rot_h[k * D + d];  // coalesced over d
    const float sm = softmax_scale[0];
    q_rot[(size_t)bh * R * D + threadIdx.x] = s * sm * k_scale[h * D + d];
    if (d == 0) {
        float qm = 0.f;
        for (int k = 0; k < D; k++) qm += qs[r * D + k] * k_mean[h * D + k];
        q_mean[bh * R + r] = qm * sm;
    }
"""

PARTIAL = r"""
    // Template: R query heads per KV head, W words per vector (D = 8·W), T tokens per block,
    // WPT words per thread, SHARED: one codebook for all coordinates and heads.
    constexpr int D = W * 8;
    constexpr int NT = 128;
    constexpr int LPT = W / WPT;        // lanes per token
    constexpr int TL = NT / LPT;        // token lanes
    constexpr int NWARPS = NT / 32;
    constexpr int C = 8 * WPT;          // coordinates per thread
    constexpr int WS = 8 * 16 + 1;      // per-coordinate table: one pad word per code word
    constexpr int TAB = SHARED ? 16 * 32 : W * WS;
    constexpr int PS = R * T > NWARPS * R * D ? R * T : NWARPS * R * D;
    __shared__ float kt[TAB];
    __shared__ float vt[TAB];
    __shared__ float ps[PS];            // scores, then probabilities, then the value reduction

    const float NEG_INF = __int_as_float(0xff800000);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int split = blockIdx.x, n_split = gridDim.x;
    const int h = blockIdx.y, n_kv = gridDim.y;
    const int b = blockIdx.z;
    const int N = kn_shape[2];          // allocated tokens: the buffers' stride
    const int n = count_shape[0];       // coded tokens (an input's length: no host->device copy)
    const int t0 = split * T;
    const size_t bh = (size_t)b * n_kv + h;

    if (SHARED) {
        for (int i = tid; i < 16 * 32; i += NT) {
            kt[i] = k_levels[i / 32];   // head 0, coordinate 0: all the same
            vt[i] = v_levels[i / 32];
        }
    } else {
        for (int i = tid; i < D * 16; i += NT) {
            const int d = i / 16, at = (d / 8) * WS + (d % 8) * 16 + i % 16;
            kt[at] = k_levels[(size_t)h * D * 16 + i];
            vt[at] = v_levels[(size_t)h * D * 16 + i];
        }
    }
    const int w0 = (tid % LPT) * WPT;   // this thread's first word of a token
    const int tl = tid / LPT;
    // level of code c at this thread's coordinate j (0 <= j < C)
    auto level = [&](const float* tab, int j, unsigned int c) -> float {
        if (SHARED) return tab[(c << 5) | lane];
        return tab[(w0 + j / 8) * WS + (j % 8) * 16 + c];
    };
    auto load_words = [&](const unsigned int* base, unsigned int* out) {
        if (WPT == 2) {
            const uint2 v = *reinterpret_cast<const uint2*>(base);
            out[0] = v.x;
            out[1] = v.y;
        } else {
            out[0] = base[0];
        }
    };
    __syncthreads();

    // 1. scores
    {
        float qr[R][C];
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < C; j++) qr[r][j] = q[(bh * R + r) * D + w0 * 8 + j];
        }
        float qm[R];
        #pragma unroll
        for (int r = 0; r < R; r++) qm[r] = q_mean[bh * R + r];
        #pragma unroll 2
        for (int i = 0; i < T / TL; i++) {
            const int t = t0 + tl + i * TL;
            float acc[R];
            #pragma unroll
            for (int r = 0; r < R; r++) acc[r] = 0.f;
            if (t < n) {
                unsigned int wd[WPT];
                load_words(kw + (bh * N + t) * W + w0, wd);
                #pragma unroll
                for (int j = 0; j < C; j++) {
                    const float lv = level(kt, j, (wd[j / 8] >> (4 * (j % 8))) & 15u);
                    #pragma unroll
                    for (int r = 0; r < R; r++) acc[r] += qr[r][j] * lv;
                }
            }
            #pragma unroll
            for (int off = LPT / 2; off > 0; off >>= 1) {
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
            }
            if (tid % LPT == 0) {
                const float norm = t < n ? vx_to_float(kn[bh * N + t]) : 0.f;
                #pragma unroll
                for (int r = 0; r < R; r++) ps[r * T + (t - t0)] = t < n ? acc[r] * norm + qm[r] : NEG_INF;
            }
        }
    }
    __syncthreads();

    // 2. softmax statistics of this block, one warp per query head
    for (int r = warp; r < R; r += NWARPS) {
        float m = NEG_INF;
        for (int i = lane; i < T; i += 32) m = fmaxf(m, ps[r * T + i]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float l = 0.f;
        for (int i = lane; i < T; i += 32) {
            const float s = ps[r * T + i];
            const float p = s == NEG_INF ? 0.f : __expf(s - m);
            ps[r * T + i] = p;
            l += p;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        if (lane == 0) {
            m_out[(bh * n_split + split) * R + r] = m;
            l_out[(bh * n_split + split) * R + r] = l;
        }
    }
    __syncthreads();

    // 3. values: Σ p · norm · levels[code] per coordinate, in registers
    float acc[R][C];
    #pragma unroll
    for (int r = 0; r < R; r++) {
        #pragma unroll
        for (int j = 0; j < C; j++) acc[r][j] = 0.f;
    }
    #pragma unroll 2
    for (int i = 0; i < T / TL; i++) {
        const int t = t0 + tl + i * TL;
        if (t < n) {
            unsigned int wd[WPT];
            load_words(vw + (bh * N + t) * W + w0, wd);
            const float norm = vx_to_float(vn[bh * N + t]);
            float p[R];
            #pragma unroll
            for (int r = 0; r < R; r++) p[r] = ps[r * T + (t - t0)] * norm;
            #pragma unroll
            for (int j = 0; j < C; j++) {
                const float lv = level(vt, j, (wd[j / 8] >> (4 * (j % 8))) & 15u);
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] += p[r] * lv;
            }
        }
    }
    // token lanes sharing a word: first inside the warp (lanes LPT apart), then across warps
    #pragma unroll
    for (int off = LPT; off < 32; off <<= 1) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < C; j++) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], off);
        }
    }
    __syncthreads();  // every thread is done with the probabilities: ps becomes the reduction buffer
    if (lane < LPT) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < C; j++) ps[(warp * R + r) * D + w0 * 8 + j] = acc[r][j];
        }
    }
    __syncthreads();
    for (int e = tid; e < R * D; e += NT) {
        float s = 0.f;
        #pragma unroll
        for (int k = 0; k < NWARPS; k++) s += ps[k * R * D + e];
        acc_out[(bh * n_split + split) * R * D + e] = s;
    }
"""

COMBINE = r"""
    // One block per (batch, KV head, query head of the group), one thread per coordinate.
    const int row = blockIdx.x;           // (b · n_kv + h) · R + r
    const int d = threadIdx.x;
    const int n_split = m_in_shape[2];
    const int R = m_in_shape[3];
    const int D = blockDim.x;
    const size_t bh = row / R;
    float top, l, acc;
    vx_merge_splits(m_in + bh * n_split * R, l_in + bh * n_split * R, acc_in + bh * n_split * R * D,
                 n_split, R, D, row % R, d, top, l, acc);
    acc_out[(size_t)row * D + d] = acc;
    if (d == 0) {
        m_out[row] = top;
        l_out[row] = l;
    }
"""

FINISH = r"""
    // One block per (b, h), R·D threads: thread (r, e) -> out[b, h·R + r, 0, e].
    __shared__ float ys[R * D];
    const int bh = blockIdx.x;
    const int h = bh % n_kv_arr_shape[0];
    const int n_split = m_in_shape[2];
    const int r = threadIdx.x / D, d = threadIdx.x % D;
    float top, l, acc;
    vx_merge_splits(m_in + (size_t)bh * n_split * R, l_in + (size_t)bh * n_split * R,
                 acc_in + (size_t)bh * n_split * R * D, n_split, R, D, r, d, top, l, acc);
    const float mass = l;               // probability mass on coded tokens (for the mean)
    float a = 1.f;                      // rescale of the coded terms when a sink logit is the max
    if (HAS_SINKS) {                    // a sink logit is a key with no value
        const float sink = vx_to_float(sinks[h * R + r]);
        const float new_top = fmaxf(top, sink);
        a = __expf(top - new_top);
        l = l * a + __expf(sink - new_top);
    }
    ys[threadIdx.x] = acc * a * v_scale[h * D + d];
    __syncthreads();
    const float* rt = rot_t + (size_t)h * D * D;
    float s = 0.f;
    for (int k = 0; k < D; k++) s += ys[r * D + k] * rt[k * D + d];  // coalesced over d
    s += mass * a * v_mean[h * D + d];
    out[(size_t)bh * R * D + threadIdx.x] = vx_from_float<OT>(s / fmaxf(l, 1e-30f));
"""


@lru_cache(maxsize=None)
def _kernel(name: str):
    """The compiled-on-first-use kernel ``name`` (prep, partial, combine, finish)."""
    spec = {
        "prep": (["queries", "rot", "k_scale", "k_mean", "softmax_scale", "n_kv_arr"], ["q_rot", "q_mean"], PREP),
        "partial": (["q", "q_mean", "kw", "kn", "vw", "vn", "k_levels", "v_levels", "count"],
                    ["m_out", "l_out", "acc_out"], PARTIAL),
        "combine": (["m_in", "l_in", "acc_in"], ["m_out", "l_out", "acc_out"], COMBINE),
        "finish": (["m_in", "l_in", "acc_in", "sinks", "v_scale", "v_mean", "rot_t", "n_kv_arr"], ["out"], FINISH),
    }[name]
    return mx.fast.cuda_kernel(name=f"velox_decode_{name}", input_names=spec[0], output_names=spec[1],
                               source=spec[2], header=HEADER)


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
    return per_codec(codec, f"cuda_{name}", build)


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


# ---------------------------------------------------------------- dispatch


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask) with 4-bit K and V codes, head_dim 64 or 128, ≤ 8 query heads per KV head."""
    B, Hq, L, D = queries.shape
    n_kv = kv.key_codec.levels.shape[0]
    return (L == 1 and mask is None and kv.n_coded > 0 and D in (64, 128) and Hq % n_kv == 0
            and Hq // n_kv <= 8 and uniform_bits(kv.key_codec) == 4 and uniform_bits(kv.value_codec) == 4)


def tokens_per_block(n: int, groups: int, rep: int) -> int:
    """T: a power of two in [64, PS_BUDGET / R] giving about TARGET_BLOCKS blocks (fewer,
    longer blocks amortise each block's table loads and reductions and keep the merge short)."""
    T = 64
    while T * 2 * rep <= PS_BUDGET and -(-n // (T * 2)) * groups >= TARGET_BLOCKS:
        T *= 2
    return T


def _partial(q_rot: mx.array, q_mean: mx.array, kv: CompressedKV) -> tuple[mx.array, mx.array, mx.array]:
    """Per-split partials: q_rot [B, Hkv, R, D], q_mean [B, Hkv, R] float32 ->
    m, l [B, Hkv, n_split, R], acc [B, Hkv, n_split, R, D]."""
    B, n_kv, R, D = q_rot.shape
    (kw, kn), (vw, vn) = kv.keys, kv.values
    n = kv.n_coded
    T = tokens_per_block(n, B * n_kv, R)
    n_split = -(-n // T)
    shared = _tables(kv.key_codec, "shared") and _tables(kv.value_codec, "shared")
    # The kernel reads n from this input's length: a contiguous prefix view, no copy, no launch.
    count = kn.reshape(-1)[:n]
    return _kernel("partial")(
        inputs=[q_rot, q_mean, kw, kn, vw, vn, _tables(kv.key_codec, "levels"),
                _tables(kv.value_codec, "levels"), count],
        template=[("R", R), ("W", D // 8), ("T", T), ("WPT", 2 if R <= 4 else 1), ("SHARED", shared)],
        grid=(n_split * THREADS, n_kv, B), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, n_kv, n_split, R), (B, n_kv, n_split, R), (B, n_kv, n_split, R, D)],
        output_dtypes=[mx.float32] * 3)


def coded_partial(q_rot: mx.array, q_mean: Optional[mx.array], kv: CompressedKV):
    """The coded tokens' partial for ``reference.attend``: q_rot [B, Hkv, R, D] (one query
    token), q_mean [B, Hkv, R, 1] or None -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
    B, n_kv, R, D = q_rot.shape
    qm = mx.zeros((B, n_kv, R), mx.float32) if q_mean is None else q_mean.reshape(B, n_kv, R)
    m, l, acc = _partial(q_rot.astype(mx.float32), qm, kv)
    return _kernel("combine")(inputs=[m, l, acc], grid=(B * n_kv * R * D, 1, 1), threadgroup=(D, 1, 1),
                              output_shapes=[(B, n_kv, R, 1), (B, n_kv, R, 1), (B, n_kv, R, D)],
                              output_dtypes=[mx.float32] * 3)


def decode(queries: mx.array, kv: CompressedKV, scale: float, sinks: Optional[mx.array] = None) -> mx.array:
    """Attention of one query token over a cache of coded tokens only (no fp16 regions):
    queries [B, Hq, 1, D] -> [B, Hq, 1, D] in the queries' dtype, in three launches."""
    B, Hq, _, D = queries.shape
    kc, vc = kv.key_codec, kv.value_codec
    n_kv = kc.levels.shape[0]
    R = Hq // n_kv
    n_kv_arr = _shape_of(n_kv)
    q_rot, q_mean = _kernel("prep")(
        inputs=[queries, _tables(kc, "rotation"), _tables(kc, "scale"), _tables(kc, "mean"), _scalar(scale), n_kv_arr],
        template=[("R", R), ("D", D)], grid=(B * n_kv * R * D, 1, 1), threadgroup=(R * D, 1, 1),
        output_shapes=[(B, n_kv, R, D), (B, n_kv, R)], output_dtypes=[mx.float32] * 2)
    m, l, acc = _partial(q_rot, q_mean, kv)
    has_sinks = sinks is not None
    return _kernel("finish")(
        inputs=[m, l, acc, sinks if has_sinks else _scalar(0.0), _tables(vc, "scale"), _tables(vc, "mean"),
                _tables(vc, "rotation_t"), n_kv_arr],
        template=[("R", R), ("D", D), ("HAS_SINKS", has_sinks), ("OT", queries.dtype)],
        grid=(B * n_kv * R * D, 1, 1), threadgroup=(R * D, 1, 1),
        output_shapes=[queries.shape], output_dtypes=[queries.dtype])[0]
