"""Fused decode attention over 4-bit ScalarCodec codes, as an ``mx.fast.cuda_kernel``.

One thread block takes T coded tokens of one (batch, KV head) and every query head of
that group (GQA: the codes are read once for R query heads), in three passes over
shared memory:

1. scores: thread (word w, token lane) unpacks one uint32 word (8 codes) of a token's
   key and adds q_rot[d]·levels[d, code] for its 8 coordinates; the W threads of a token
   sit in one warp and reduce by shuffles; × fp16 norm (+ q·mean);
2. softmax: one warp per query head takes the block's max and Σ exp;
3. values: the same threads add p·norm·levels[d, code] of the value codes into registers,
   reduced across token lanes by shuffles and then across warps in shared memory.

Each block writes a flash-decoding partial (max, Σ exp, value sum in the value codec's
standardised basis); a second small kernel merges the blocks' partials, and
``reference.attend`` merges the result with the fp16 regions and the attention sinks and
un-rotates once. Only decode (one query token, no mask) with
4-bit keys and values, head_dim 64 or 128, goes here; everything else takes the reference.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .reference import CompressedKV, per_codec, uniform_bits

THREADS = 128

HEADER = r"""
// fp16 bits -> float without cuda_fp16.h (norms arrive as their uint16 bits).
__device__ inline float half_bits_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h >> 15) << 31;
    unsigned int exp = (h >> 10) & 0x1f;
    unsigned int mant = h & 0x3ff;
    if (exp == 0) {
        float f = (float)mant * 5.9604644775390625e-8f;  // subnormal: mant · 2^-24
        return sign ? -f : f;
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    return __uint_as_float(sign | ((exp + 112) << 23) | (mant << 13));
}
"""

SOURCE = r"""
    // Template: R query heads per KV head, W words per vector (D = 8·W), T tokens per block.
    constexpr int D = W * 8;
    constexpr int NT = 128;
    constexpr int TL = NT / W;          // token lanes
    constexpr int NWARPS = NT / 32;
    // levels[d, code] at w·WS + j·16 + code for d = 8w + j: the pad word spreads the W threads
    // of a token (one word each) over banks instead of all hitting one.
    constexpr int WS = 8 * 16 + 1;
    __shared__ float kt[W * WS];
    __shared__ float vt[W * WS];
    __shared__ float ps[R * T];
    __shared__ float red[NWARPS * R * D];

    const float NEG_INF = __int_as_float(0xff800000);  // NVRTC has no <cmath> INFINITY
    const int tid = threadIdx.x;
    const int split = blockIdx.x;
    const int h = blockIdx.y;
    const int n_kv = gridDim.y;
    const int b = blockIdx.z;
    const int n_split = gridDim.x;
    const int N = kw_shape[2];          // allocated tokens: the buffers' stride
    const int n = n_coded[0];
    const int t0 = split * T;
    const size_t bh = (size_t)b * n_kv + h;

    for (int i = tid; i < D * 16; i += NT) {
        const int d = i / 16, at = (d / 8) * WS + (d % 8) * 16 + i % 16;
        kt[at] = k_levels[(size_t)h * D * 16 + i];
        vt[at] = v_levels[(size_t)h * D * 16 + i];
    }
    const int w = tid % W;
    const int tl = tid / W;
    float qr[R][8];  // this thread's 8 coordinates of every query head, in registers
    #pragma unroll
    for (int r = 0; r < R; r++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) qr[r][j] = q[(bh * R + r) * D + w * 8 + j];
    }
    const float* ktw = kt + w * WS;
    const float* vtw = vt + w * WS;
    __syncthreads();

    // 1. scores
    #pragma unroll 4
    for (int i = 0; i < T / TL; i++) {
        const int t = t0 + tl + i * TL;
        float acc[R];
        #pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
        if (t < n) {
            const unsigned int word = kw[(bh * N + t) * W + w];
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                const float lv = ktw[j * 16 + ((word >> (4 * j)) & 15u)];
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r] += qr[r][j] * lv;
            }
        }
        #pragma unroll
        for (int off = W / 2; off > 0; off >>= 1) {
            #pragma unroll
            for (int r = 0; r < R; r++) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
        }
        if (w == 0) {
            const float norm = t < n ? half_bits_to_float(kn[bh * N + t]) : 0.f;
            #pragma unroll
            for (int r = 0; r < R; r++)
                ps[r * T + (t - t0)] = t < n ? acc[r] * norm + q_mean[bh * R + r] : NEG_INF;
        }
    }
    __syncthreads();

    // 2. softmax statistics of this block, one warp per query head
    const int warp = tid / 32, lane = tid % 32;
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
    float acc[R][8];
    #pragma unroll
    for (int r = 0; r < R; r++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) acc[r][j] = 0.f;
    }
    #pragma unroll 4
    for (int i = 0; i < T / TL; i++) {
        const int t = t0 + tl + i * TL;
        if (t < n) {
            const unsigned int word = vw[(bh * N + t) * W + w];
            const float norm = half_bits_to_float(vn[bh * N + t]);
            float lv[8];
            #pragma unroll
            for (int j = 0; j < 8; j++) lv[j] = vtw[j * 16 + ((word >> (4 * j)) & 15u)] * norm;
            #pragma unroll
            for (int r = 0; r < R; r++) {
                const float p = ps[r * T + (t - t0)];
                #pragma unroll
                for (int j = 0; j < 8; j++) acc[r][j] += p * lv[j];
            }
        }
    }
    // token lanes sharing a word: first inside the warp (lanes W apart), then across warps
    #pragma unroll
    for (int off = W; off < 32; off <<= 1) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < 8; j++) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], off);
        }
    }
    if (lane < W) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < 8; j++) red[(warp * R + r) * D + w * 8 + j] = acc[r][j];
        }
    }
    __syncthreads();
    for (int e = tid; e < R * D; e += NT) {
        float s = 0.f;
        #pragma unroll
        for (int k = 0; k < NWARPS; k++) s += red[k * R * D + e];
        acc_out[(bh * n_split + split) * R * D + e] = s;
    }
"""


COMBINE = r"""
    // One block per (batch, KV head, query head of the group), one thread per coordinate:
    // merge the blocks' partials as flash-decoding does (every block holds a token).
    const int row = blockIdx.x;           // (b · n_kv + h) · R + r
    const int d = threadIdx.x;
    const int n_split = m_in_shape[2];
    const int R = m_in_shape[3];
    const int D = blockDim.x;
    const size_t bh = row / R;
    const int r = row % R;
    float top = m_in[(bh * n_split) * R + r];
    for (int s = 1; s < n_split; s++) top = fmaxf(top, m_in[(bh * n_split + s) * R + r]);
    float l = 0.f, acc = 0.f;
    for (int s = 0; s < n_split; s++) {
        const float w = __expf(m_in[(bh * n_split + s) * R + r] - top);
        l += l_in[(bh * n_split + s) * R + r] * w;
        acc += acc_in[((bh * n_split + s) * R + r) * D + d] * w;
    }
    acc_out[(size_t)row * D + d] = acc;
    if (d == 0) {
        m_out[row] = top;
        l_out[row] = l;
    }
"""


@lru_cache(maxsize=None)
def _combine():
    return mx.fast.cuda_kernel(name="velox_decode_combine", input_names=["m_in", "l_in", "acc_in"],
                               output_names=["m_out", "l_out", "acc_out"], source=COMBINE)


@lru_cache(maxsize=None)
def _kernel():
    return mx.fast.cuda_kernel(
        name="velox_decode_4bit",
        input_names=["q", "q_mean", "kw", "kn", "vw", "vn", "k_levels", "v_levels", "n_coded"],
        output_names=["m_out", "l_out", "acc_out"],
        source=SOURCE, header=HEADER)


def _dense_levels(codec) -> mx.array:
    """levels [H, D, 16] float32, contiguous (turboquant's are a broadcast view)."""
    levels = mx.contiguous(codec.levels.astype(mx.float32))
    mx.eval(levels)
    return levels


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask) with 4-bit K and V codes, head_dim 64 or 128, ≤ 8 query heads per KV head."""
    B, Hq, L, D = queries.shape
    n_kv = kv.key_codec.levels.shape[0]
    return (L == 1 and mask is None and kv.n_coded > 0 and D in (64, 128) and Hq // n_kv <= 8
            and uniform_bits(kv.key_codec) == 4 and uniform_bits(kv.value_codec) == 4)


def tokens_per_block(n: int, groups: int) -> int:
    """T: the largest of 256/128/64 that still gives ~2 blocks per SM of a big GPU."""
    for T in (256, 128):
        if -(-n // T) * groups >= 264:
            return T
    return 64


def coded_partial(q_rot: mx.array, q_mean: Optional[mx.array], kv: CompressedKV):
    """The coded tokens' partial for ``reference.attend``: q_rot [B, Hkv, R, D] (one query
    token) -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
    B, n_kv, R, D = q_rot.shape
    (kw, kn), (vw, vn) = kv.keys, kv.values
    n = kv.n_coded
    T = tokens_per_block(n, B * n_kv)
    n_split = -(-n // T)
    qm = mx.zeros((B, n_kv, R), mx.float32) if q_mean is None else q_mean.reshape(B, n_kv, R)
    m, l, acc = _kernel()(
        inputs=[q_rot.astype(mx.float32), qm, kw, kn.view(mx.uint16), vw, vn.view(mx.uint16),
                per_codec(kv.key_codec, "levels", _dense_levels), per_codec(kv.value_codec, "levels", _dense_levels),
                mx.array([n], dtype=mx.int32)],
        template=[("R", R), ("W", D // 8), ("T", T)],
        grid=(n_split * THREADS, n_kv, B), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, n_kv, n_split, R), (B, n_kv, n_split, R), (B, n_kv, n_split, R, D)],
        output_dtypes=[mx.float32] * 3)
    m, l, acc = _combine()(inputs=[m, l, acc], grid=(B * n_kv * R * D, 1, 1), threadgroup=(D, 1, 1),
                           output_shapes=[(B, n_kv, R, 1), (B, n_kv, R, 1), (B, n_kv, R, D)],
                           output_dtypes=[mx.float32] * 3)
    return m, l, acc
