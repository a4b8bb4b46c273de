"""Kernel sources, written once for CUDA and Metal: a prelude per backend around shared bodies.

Fused decode attention over 4-bit ScalarCodec codes, in three launches (each extra mx op
costs a launch per layer and step, which at decode is worth as much as the kernel itself):

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

``combine`` is 3's merge alone (no sinks, no output), for ``reference.attend`` when the cache
also holds fp16 sink/window tokens.

Level lookups: when every coordinate of every head shares one codebook (turboquant), each
lane reads its own copy of the 16 levels (table[code·32 + lane]): shared-memory gathers with
random codes would otherwise collide on banks. Per-coordinate codebooks use a padded
[word][8·16] table.

The bodies use only the ``VX_*`` macros and ``vx_*`` helpers below for what the backends
spell differently; ``render`` puts a backend's prelude in front. The index macros go into
the kernel source, not the header: MLX's Metal wrapper adds a ``[[thread_position_in_...]]``
argument to the kernel's signature only when the source names it. Both wrappers take the
body only (they write the signature from the input and output names) plus a header.
"""

from __future__ import annotations

from typing import NamedTuple


class Prelude(NamedTuple):
    header: str  # address spaces, barriers, shuffles, math, conversions
    index: str  # thread/block indices: prepended to the kernel source


CUDA = Prelude(header=r"""
#define VX_FUNC __device__ inline
#define VX_GLOBAL                       // one generic address space: no qualifier
#define VX_SHARED __shared__
#define VX_SHARED_PTR
#define VX_BARRIER() __syncthreads()
#define VX_SHFL_XOR(x, off) __shfl_xor_sync(0xffffffffu, (x), (off))
#define VX_POPC(x) __popc(x)            // for sign-code (RaBitQ, QJL) kernels
#define VX_NEG_INF __int_as_float(0xff800000)
#define VX_EXP __expf
#define VX_MAX fmaxf
// Explicit conversions: the implicit __half/__nv_bfloat16 ones may be compiled out.
__device__ inline float vx_to_float(float x) { return x; }
__device__ inline float vx_to_float(__half x) { return __half2float(x); }
__device__ inline float vx_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T vx_from_float(float x);
template <> __device__ inline float vx_from_float<float>(float x) { return x; }
template <> __device__ inline __half vx_from_float<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 vx_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
""", index=r"""
#define VX_THREAD_IDX ((int)threadIdx.x)
#define VX_BLOCK_DIM ((int)blockDim.x)
#define VX_BLOCK_IDX(c) ((int)blockIdx.c)
#define VX_GRID_DIM(c) ((int)gridDim.c)
""")

METAL = Prelude(header=r"""
#define VX_FUNC inline
#define VX_GLOBAL device                // pointers into kernel arguments
#define VX_SHARED threadgroup
#define VX_SHARED_PTR threadgroup
#define VX_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define VX_SHFL_XOR(x, off) simd_shuffle_xor((x), (ushort)(off))  // Apple GPUs: 32-wide SIMD groups
#define VX_POPC(x) popcount(x)          // for sign-code (RaBitQ, QJL) kernels
#define VX_NEG_INF (-INFINITY)
#define VX_EXP metal::exp               // not fast::exp: exp(-inf) must stay 0
#define VX_MAX metal::fmax
template <typename T> inline float vx_to_float(T x) { return static_cast<float>(x); }
template <typename T> inline T vx_from_float(float x) { return static_cast<T>(x); }
""", index=r"""
#define VX_THREAD_IDX ((int)thread_position_in_threadgroup.x)
#define VX_BLOCK_DIM ((int)threads_per_threadgroup.x)
#define VX_BLOCK_IDX(c) ((int)threadgroup_position_in_grid.c)
#define VX_GRID_DIM(c) ((int)threadgroups_per_grid.c)
""")

PRELUDES = {"cuda": CUDA, "metal": METAL}

HELPERS = r"""
struct VxMerged {
    float top;  // max logit over the splits
    float l;    // Σ exp(logit - top)
    float acc;  // Σ exp(logit - top) · value, one coordinate
};

// Merge one (batch·KV head, query head r) row's split partials, flash-decoding style.
// m_in/l_in [n_split, R] and acc_in [n_split, R, D] start at this (batch, KV head).
// Pointer types are template parameters: Metal binds inputs of fewer than 8 elements in the
// constant address space and larger ones in device, so m_in and acc_in may differ.
template <typename PM, typename PL, typename PA>
VX_FUNC VxMerged vx_merge_splits(PM m_in, PL l_in, PA acc_in, int n_split, int R, int D, int r, int d) {
    VxMerged out;
    out.top = m_in[r];
    for (int s = 1; s < n_split; s++) out.top = VX_MAX(out.top, m_in[s * R + r]);
    out.l = 0.f;
    out.acc = 0.f;
    for (int s = 0; s < n_split; s++) {
        const float w = VX_EXP(m_in[s * R + r] - out.top);
        out.l += l_in[s * R + r] * w;
        out.acc += acc_in[(s * R + r) * D + d] * w;
    }
    return out;
}
"""

PREP = r"""
    // One block per (b, h), R·D threads: thread (r, d) -> q'[r, d]; threads d = 0 also q·mean.
    VX_SHARED float qs[R * D];
    const int tid = VX_THREAD_IDX;
    const int bh = VX_BLOCK_IDX(x);
    const int h = bh % n_kv_arr_shape[0];
    const int r = tid / D, d = tid % D;
    qs[tid] = vx_to_float(queries[(size_t)bh * R * D + tid]);
    VX_BARRIER();
    const VX_GLOBAL float* rot_h = rot + (size_t)h * D * D;
    float s = 0.f;
    for (int k = 0; k < D; k++) s += qs[r * D + k] * rot_h[k * D + d];  // coalesced over d
    const float sm = softmax_scale[0];
    q_rot[(size_t)bh * R * D + tid] = s * sm * k_scale[h * D + d];
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
    constexpr int RED = NWARPS * R * D; // pass 3's cross-warp reduction: reuses the whole buffer
    constexpr int PS = R * T > RED - 2 * TAB ? R * T : RED - 2 * TAB;
    // [key table | value table | scores, then probabilities]; one array so that pass 3's
    // reduction can reuse the tables too (Metal allows 32 KiB of shared memory per block).
    VX_SHARED float smem[2 * TAB + PS];
    VX_SHARED_PTR float* kt = smem;
    VX_SHARED_PTR float* vt = smem + TAB;
    VX_SHARED_PTR float* ps = smem + 2 * TAB;

    const float NEG_INF = VX_NEG_INF;
    const int tid = VX_THREAD_IDX, lane = tid % 32, warp = tid / 32;
    const int split = VX_BLOCK_IDX(x), n_split = VX_GRID_DIM(x);
    const int h = VX_BLOCK_IDX(y), n_kv = VX_GRID_DIM(y);
    const int b = VX_BLOCK_IDX(z);
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
    // Macros, not lambdas or functions: Metal has no lambdas, and a function would need the
    // tables' and registers' address spaces spelled per backend.
    // level of code c at this thread's coordinate j (0 <= j < C)
    #define VX_LEVEL(tab, j, c) (SHARED ? (tab)[((c) << 5) | lane] : (tab)[(w0 + (j) / 8) * WS + ((j) % 8) * 16 + (c)])
    // this thread's WPT words of a token, one 8-byte load when WPT = 2
    #define VX_LOAD_WORDS(base, out) do {                                                  \
        if (WPT == 2) {                                                                    \
            const uint2 v_ = *reinterpret_cast<const VX_GLOBAL uint2*>(base);              \
            (out)[0] = v_.x;                                                               \
            (out)[WPT - 1] = v_.y;                                                         \
        } else {                                                                           \
            (out)[0] = (base)[0];                                                          \
        }                                                                                  \
    } while (0)
    VX_BARRIER();

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
                VX_LOAD_WORDS(kw + (bh * N + t) * W + w0, wd);
                #pragma unroll
                for (int j = 0; j < C; j++) {
                    const float lv = VX_LEVEL(kt, j, (wd[j / 8] >> (4 * (j % 8))) & 15u);
                    #pragma unroll
                    for (int r = 0; r < R; r++) acc[r] += qr[r][j] * lv;
                }
            }
            #pragma unroll
            for (int off = LPT / 2; off > 0; off >>= 1) {
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r] += VX_SHFL_XOR(acc[r], off);
            }
            if (tid % LPT == 0) {
                const float norm = t < n ? vx_to_float(kn[bh * N + t]) : 0.f;
                #pragma unroll
                for (int r = 0; r < R; r++) ps[r * T + (t - t0)] = t < n ? acc[r] * norm + qm[r] : NEG_INF;
            }
        }
    }
    VX_BARRIER();

    // 2. softmax statistics of this block, one warp per query head
    for (int r = warp; r < R; r += NWARPS) {
        float m = NEG_INF;
        for (int i = lane; i < T; i += 32) m = VX_MAX(m, ps[r * T + i]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = VX_MAX(m, VX_SHFL_XOR(m, off));
        float l = 0.f;
        for (int i = lane; i < T; i += 32) {
            const float s = ps[r * T + i];
            const float p = s == NEG_INF ? 0.f : VX_EXP(s - m);
            ps[r * T + i] = p;
            l += p;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += VX_SHFL_XOR(l, off);
        if (lane == 0) {
            m_out[(bh * n_split + split) * R + r] = m;
            l_out[(bh * n_split + split) * R + r] = l;
        }
    }
    VX_BARRIER();

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
            VX_LOAD_WORDS(vw + (bh * N + t) * W + w0, wd);
            const float norm = vx_to_float(vn[bh * N + t]);
            float p[R];
            #pragma unroll
            for (int r = 0; r < R; r++) p[r] = ps[r * T + (t - t0)] * norm;
            #pragma unroll
            for (int j = 0; j < C; j++) {
                const float lv = VX_LEVEL(vt, j, (wd[j / 8] >> (4 * (j % 8))) & 15u);
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] += p[r] * lv;
            }
        }
    }
    #undef VX_LEVEL
    #undef VX_LOAD_WORDS
    // token lanes sharing a word: first inside the warp (lanes LPT apart), then across warps
    #pragma unroll
    for (int off = LPT; off < 32; off <<= 1) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < C; j++) acc[r][j] += VX_SHFL_XOR(acc[r][j], off);
        }
    }
    VX_BARRIER();  // every thread is done with the tables and probabilities: smem becomes the reduction buffer
    if (lane < LPT) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < C; j++) smem[(warp * R + r) * D + w0 * 8 + j] = acc[r][j];
        }
    }
    VX_BARRIER();
    for (int e = tid; e < R * D; e += NT) {
        float s = 0.f;
        #pragma unroll
        for (int k = 0; k < NWARPS; k++) s += smem[k * R * D + e];
        acc_out[(bh * n_split + split) * R * D + e] = s;
    }
"""

COMBINE = r"""
    // One block per (batch, KV head, query head of the group), one thread per coordinate.
    const int row = VX_BLOCK_IDX(x);      // (b · n_kv + h) · R + r
    const int d = VX_THREAD_IDX;
    const int n_split = m_in_shape[2];
    const int R = m_in_shape[3];
    const int D = VX_BLOCK_DIM;
    const size_t bh = row / R;
    const VxMerged mg = vx_merge_splits(m_in + bh * n_split * R, l_in + bh * n_split * R,
                                        acc_in + bh * n_split * R * D, n_split, R, D, row % R, d);
    acc_out[(size_t)row * D + d] = mg.acc;
    if (d == 0) {
        m_out[row] = mg.top;
        l_out[row] = mg.l;
    }
"""

FINISH = r"""
    // One block per (b, h), R·D threads: thread (r, e) -> out[b, h·R + r, 0, e].
    VX_SHARED float ys[R * D];
    const int tid = VX_THREAD_IDX;
    const int bh = VX_BLOCK_IDX(x);
    const int h = bh % n_kv_arr_shape[0];
    const int n_split = m_in_shape[2];
    const int r = tid / D, d = tid % D;
    const VxMerged mg = vx_merge_splits(m_in + (size_t)bh * n_split * R, l_in + (size_t)bh * n_split * R,
                                        acc_in + (size_t)bh * n_split * R * D, n_split, R, D, r, d);
    const float mass = mg.l;            // probability mass on coded tokens (for the mean)
    float l = mg.l;
    float a = 1.f;                      // rescale of the coded terms when a sink logit is the max
    if (HAS_SINKS) {                    // a sink logit is a key with no value
        const float sink = vx_to_float(sinks[h * R + r]);
        const float new_top = VX_MAX(mg.top, sink);
        a = VX_EXP(mg.top - new_top);
        l = l * a + VX_EXP(sink - new_top);
    }
    ys[tid] = mg.acc * a * v_scale[h * D + d];
    VX_BARRIER();
    const VX_GLOBAL float* rt = rot_t + (size_t)h * D * D;
    float s = 0.f;
    for (int k = 0; k < D; k++) s += ys[r * D + k] * rt[k * D + d];  // coalesced over d
    s += mass * a * v_mean[h * D + d];
    out[(size_t)bh * R * D + tid] = vx_from_float<OT>(s / VX_MAX(l, 1e-30f));
"""

# name -> (input names, output names, body)
KERNELS = {
    "prep": (["queries", "rot", "k_scale", "k_mean", "softmax_scale", "n_kv_arr"], ["q_rot", "q_mean"], PREP),
    "partial": (["q", "q_mean", "kw", "kn", "vw", "vn", "k_levels", "v_levels", "count"],
                ["m_out", "l_out", "acc_out"], PARTIAL),
    "combine": (["m_in", "l_in", "acc_in"], ["m_out", "l_out", "acc_out"], COMBINE),
    "finish": (["m_in", "l_in", "acc_in", "sinks", "v_scale", "v_mean", "rot_t", "n_kv_arr"], ["out"], FINISH),
}


def render(name: str, backend: str) -> tuple[str, str]:
    """(header, source) of kernel ``name`` for ``backend`` ('cuda' or 'metal'): the backend's
    prelude followed by the shared helpers and the shared body, verbatim."""
    prelude = PRELUDES[backend]
    return prelude.header + HELPERS, prelude.index + KERNELS[name][2]
