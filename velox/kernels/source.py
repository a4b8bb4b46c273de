"""Kernel sources, written once for CUDA and Metal: a prelude per backend around a shared body.

Fused decode attention over ScalarCodec codes (2 or 4 bits for keys and values), one launch
per step: every extra launch costs as much as the kernel itself at decode.
One block per (batch, KV head, split of T coded tokens) reads the split's codes once for
every query head of the group (GQA) and:

0. puts the group's R query rows into the key codec's basis, q' = scale · (q @ R_k) · s_k,
   and q·mean_k (``ROTATE``; ``reference.attend`` passes them already rotated). ``HAD``:
   R = diag(signs)·H/√D (turboquant's randomized Hadamard) is a Walsh-Hadamard transform
   in shared memory; reading a dense D×D matrix in every block cost ~16 µs per block;
1. scores: each thread unpacks its CPT coordinates of a token, looks the levels up,
   reduces across the token's lanes by shuffles; × fp16 norm + q·mean. Words and norms
   go in batches of PF tokens, the next batch loaded while this one is scored;
2. the split's softmax statistics (one warp per query head);
3. Σ p·norm·levels[code] per coordinate in registers, reduced across token lanes, written
   as a flash-decoding partial (max, Σ exp, value sum in the value codec's basis);
   On CUDA sm_80 and later (``VX_MMA``, set by the CUDA prelude) passes 1 and 3 run on tensor
   cores instead: each warp decodes 16-token tiles into mma.m16n8k16 fragments (keys × rotated
   queries for the scores, values × p·norm for the sums; fragment layouts at ``vx_mma``) with
   two tiles' loads in flight. The passes are bound by instruction issue and latency, not
   bytes. A shared codebook whose levels are exact in fp16 (``KPAIR``/``VPAIR``: turboquant
   rounds its levels so) goes through a pair table: one shared load gives two codes' levels
   as the mma operand, ~2 instructions per code in the SASS (sm_90, ``scripts/kernel_sass.py``).
   Other levels go in as fp16 hi + lo halves (``vx_hilo``; rounded once, every token using a
   level would share its error: 2.4e-3 relative at 64k tokens), ~5 per code; ~8 on CUDA cores;
4. the merge, in two levels: the last block of each group of ``MG`` splits to finish (an
   atomic counter per group) merges them into the group's first slot, and the last group
   merged merges the groups (a single group: the splits straight to the output). The
   splits' partials live in a persistent scratch input. The counters are a persistent zeroed
   array that the last blocks zero again (an output
   would need MLX's init_value, which fills every output: measured ~40 µs for five, more
   than the kernel); launches sharing it are chained (``chain``: the previous launch's
   output, an unused input) so that MLX's graph, which runs independent nodes
   concurrently, never runs two at once.
   ``FINISH``: with the attention-sink logits, × s_v, un-rotated once (@ R_vᵀ), + the value
   mean, ÷ the softmax sum, in the queries' dtype. Otherwise it writes the merged max, sum
   and value sum for ``reference.attend`` to merge with the cache's fp16 sink/window tokens.

``APPEND``: the launch also encodes the decode step's key and value (``VX_ENCODE``, as
ScalarCodec.encode: centre, norm, rotate, standardise, count boundaries, pack) straight into
the cache's code buffers, in place, so that a layer's step is one launch (each costs ~30 µs of
MLX's CPU work on the H200's host). An extra split, the grid's first block, holds just that
token: it encodes it, then scores it like any split, while the other splits stop short of its
slot; it stays off the critical path.
``append`` (the second kernel) does the encoding alone, for a cache read before its decode
launch. MLX orders GPU work by the arrays a launch outputs, so either write is ordered before
the next launch through the same ``chain`` input.

Level lookups: when every coordinate of every head shares one codebook (turboquant), each
lane reads its own copy of the levels (table[code·32 + lane], pair tables table[pair·32 +
lane]): shared-memory gathers with random codes would otherwise collide on banks.
Per-coordinate codebooks use a padded [group of 8 coordinates][8 · levels] table.

The body uses only the ``VX_*`` macros and ``vx_*`` helpers below for what the backends
spell differently; ``render`` puts a backend's prelude in front. The index macros go into
the kernel source, not the header: MLX's Metal wrapper adds a ``[[thread_position_in_...]]``
argument to the kernel's signature only when the source names it. Both wrappers take the
body only (they write the signature from the input and output names) plus a header.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Prelude(NamedTuple):
    header: str  # address spaces, barriers, shuffles, atomics, math, conversions
    index: str  # thread/block indices: prepended to the kernel source


CUDA = Prelude(header=r"""
#define VX_FUNC __device__ inline
#define VX_GLOBAL                       // one generic address space: no qualifier
#define VX_SHARED __shared__ __align__(16)  // 16: the pair tables' 4-word stores
#define VX_SHARED_PTR
#define VX_BARRIER() __syncthreads()
#define VX_SHFL_XOR(x, off) __shfl_xor_sync(0xffffffffu, (x), (off))
#define VX_POPC(x) __popc(x)            // for sign-code (RaBitQ, QJL) kernels
#define VX_NEG_INF __int_as_float(0xff800000)
#define VX_EXP __expf
#define VX_MAX fmaxf
#define VX_SQRT sqrtf
// Cross-block hand-off: fence the partials, count the finished blocks in a persistent
// counter (an input: written through a cast), read the others' partials past L1 (not
// coherent across SMs).
#define VX_DEVICE_FENCE() __threadfence()
#define VX_ATOMIC_INC(p) atomicAdd((unsigned int*)(p), 1u)
#define VX_ATOMIC_RESET(p) atomicExch((unsigned int*)(p), 0u)
#define VX_LOAD_CG(p) __ldcg(p)
#define VX_LOAD_CG4(p) __ldcg(reinterpret_cast<const float4*>(p))
#define VX_MUT(T, p) ((T*)(p))              // an input written in place
// Explicit conversions: the implicit __half/__nv_bfloat16 ones may be compiled out.
__device__ inline float vx_to_float(float x) { return x; }
__device__ inline float vx_to_float(__half x) { return __half2float(x); }
__device__ inline float vx_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T vx_from_float(float x);
template <> __device__ inline float vx_from_float<float>(float x) { return x; }
template <> __device__ inline __half vx_from_float<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 vx_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
// Tensor cores (sm_80 on): the decode body's scores and values passes run as mma tiles.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define VX_MMA 1
__device__ inline unsigned int vx_half2(float lo, float hi) {  // two fp16 in one register, lo first
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned int*>(&h);
}
// x as two fp16, hi = fp16(x) in the low half and lo = fp16(x − hi) in the high half: levels
// rounded once to fp16 would bias every token that uses them the same way (measured: 2.4e-3
// relative error of the output at 64k tokens); hi + lo is exact to ~2^-22.
__device__ inline unsigned int vx_hilo(float x) {
    const __half hi = __float2half_rn(x);
    const __half lo = __float2half_rn(x - __half2float(hi));
    return (unsigned int)__half_as_ushort(hi) | ((unsigned int)__half_as_ushort(lo) << 16);
}
// d [16×8, fp32] += a [16×16, fp16, row-major fragment] · b [16×8, fp16, column-major fragment]:
// lane (g, c) = (lane / 4, lane % 4) holds a rows g, g + 8 × columns 2c, 2c + 1, 2c + 8, 2c + 9
// (a[0] = (g, 2c..), a[1] = (g + 8, 2c..), a[2] = (g, 2c + 8..), a[3] = (g + 8, 2c + 8..)), b rows
// 2c, 2c + 1 (b[0]) and 2c + 8, 2c + 9 (b[1]) × column g, d rows g (d[0], d[1]) and g + 8 (d[2],
// d[3]) × columns 2c, 2c + 1 (PTX ISA, mma.m16n8k16).
__device__ inline void vx_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
""", index=r"""
#define VX_THREAD_IDX ((int)threadIdx.x)
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
#define VX_SQRT metal::sqrt
// Cross-block hand-off (device-scope fences: Metal 3.2, macOS 15).
#define VX_DEVICE_FENCE() atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device)
#define VX_ATOMIC_INC(p) atomic_fetch_add_explicit((device atomic_uint*)(p), 1u, memory_order_relaxed)
#define VX_ATOMIC_RESET(p) atomic_store_explicit((device atomic_uint*)(p), 0u, memory_order_relaxed)
#define VX_LOAD_CG(p) (*(p))
#define VX_LOAD_CG4(p) (*reinterpret_cast<const device float4*>(p))
#define VX_MUT(T, p) ((device T*)(p))       // an input written in place
template <typename T> inline float vx_to_float(T x) { return static_cast<float>(x); }
template <typename T> inline T vx_from_float(float x) { return static_cast<T>(x); }
""", index=r"""
#define VX_THREAD_IDX ((int)thread_position_in_threadgroup.x)
#define VX_BLOCK_IDX(c) ((int)threadgroup_position_in_grid.c)
#define VX_GRID_DIM(c) ((int)threadgroups_per_grid.c)
""")

PRELUDES = {"cuda": CUDA, "metal": METAL}

HELPERS = r"""
// this thread's NW (1, 2 or 4) words of a token into registers out[NW], in one load.
// A macro: a function would need the registers' address space spelled per backend.
#define VX_LOAD_WORDS(base, out, NW) do {                                                  \
        if ((NW) == 4) {                                                                   \
            const uint4 v_ = *reinterpret_cast<const VX_GLOBAL uint4*>(base);              \
            (out)[0] = v_.x;                                                               \
            (out)[1 % (NW)] = v_.y;                                                        \
            (out)[2 % (NW)] = v_.z;                                                        \
            (out)[3 % (NW)] = v_.w;                                                        \
        } else if ((NW) == 2) {                                                            \
            const uint2 v_ = *reinterpret_cast<const VX_GLOBAL uint2*>(base);              \
            (out)[0] = v_.x;                                                               \
            (out)[(NW) - 1] = v_.y;                                                        \
        } else {                                                                           \
            (out)[0] = (base)[0];                                                          \
        }                                                                                  \
    } while (0)

// In-place unnormalised Walsh-Hadamard transform (Sylvester order) of the NR rows of the
// shared array buf [NR, D]; every thread of the block must reach it (barriers inside).
// Bit operations for the butterflies' indices (a division by hh_ took ~20 instructions), loops
// kept rolled (unrolled, ptxas gave the decode kernel 156 registers instead of 120).
#define VX_FWHT(buf, NR) do {                                                               \
        _Pragma("unroll 1")                                                                \
        for (int hh_ = 1; hh_ < D; hh_ <<= 1) {                                            \
            _Pragma("unroll 1")                                                            \
            for (int i_ = tid; i_ < (NR) * D / 2; i_ += NT) {                              \
                const int j_ = i_ % (D / 2);                                               \
                const int a_ = (i_ / (D / 2)) * D + ((j_ & ~(hh_ - 1)) << 1) + (j_ & (hh_ - 1)); \
                const float x_ = (buf)[a_], y_ = (buf)[a_ + hh_];                           \
                (buf)[a_] = x_ + y_;                                                       \
                (buf)[a_ + hh_] = x_ - y_;                                                 \
            }                                                                              \
            VX_BARRIER();                                                                  \
        }                                                                                  \
    } while (0)

// ScalarCodec.encode of token bh's vector x [.., D] into slot pos of the buffers words [.., N_,
// D·BITS/32] / norms [.., N_] (NDT), in place: centre, norm, rotate the unit vector (HADV: the
// signs rot [H, D], then a Walsh-Hadamard transform; else the matrix, element [k, d] at
// rot[h·D·D + k·SK + d·SD]), standardise, count the boundaries each coordinate exceeds (the
// midpoints of its levels [H, D, 2^BITS], as ScalarCodec's), pack the codes (lane j of a word at
// bit j·BITS, as scalar.shift_into_lanes). xs [D] float, cs [D] unsigned int, red [NWARPS] float: shared
// scratch. Every thread of the block must reach it (barriers inside).
#define VX_ENCODE(x, mean, rot, SK, SD, scale, levels, words, norms, N_, BITS, HADV, xs, cs, red, pos) do { \
        for (int d_ = tid; d_ < D; d_ += NT) (xs)[d_] = vx_to_float((x)[bh * D + d_]) - (mean)[h * D + d_]; \
        float a_ = 0.f;                                                                    \
        for (int d_ = tid; d_ < D; d_ += NT) a_ += (xs)[d_] * (xs)[d_];                    \
        for (int off_ = 16; off_ > 0; off_ >>= 1) a_ += VX_SHFL_XOR(a_, off_);             \
        if (lane == 0) (red)[warp] = a_;                                                   \
        VX_BARRIER();                                                                      \
        float nrm_ = 0.f;                                                                  \
        for (int w_ = 0; w_ < NWARPS; w_++) nrm_ += (red)[w_];                             \
        nrm_ = VX_SQRT(nrm_);                                                              \
        const float den_ = VX_MAX(nrm_, 1e-20f);                                           \
        for (int d_ = tid; d_ < D; d_ += NT) (xs)[d_] = (xs)[d_] / den_ * ((HADV) ? (rot)[h * D + d_] : 1.f); \
        VX_BARRIER();                                                                      \
        if (HADV) VX_FWHT(xs, 1);                                                          \
        for (int d_ = tid; d_ < D; d_ += NT) {                                             \
            float y_ = 0.f;                                                                \
            if (HADV) {                                                                    \
                y_ = (xs)[d_] * INV_SQRT_D;                                                \
            } else {                                                                       \
                for (int k_ = 0; k_ < D; k_++) y_ += (xs)[k_] * (rot)[(size_t)h * D * D + k_ * (SK) + d_ * (SD)]; \
            }                                                                              \
            const float z_ = y_ / (scale)[h * D + d_];                                     \
            const size_t l_ = ((size_t)h * D + d_) << (BITS);                              \
            unsigned int c_ = 0u;                                                          \
            for (int i_ = 0; i_ + 1 < (1 << (BITS)); i_++) c_ += z_ > ((levels)[l_ + i_ + 1] + (levels)[l_ + i_]) / 2 ? 1u : 0u; \
            (cs)[d_] = c_;                                                                 \
        }                                                                                  \
        VX_BARRIER();                                                                      \
        for (int w_ = tid; w_ < D * (BITS) / 32; w_ += NT) {                               \
            unsigned int word_ = 0u;                                                       \
            for (int j_ = 0; j_ < 32 / (BITS); j_++) word_ |= (cs)[w_ * (32 / (BITS)) + j_] << (j_ * (BITS)); \
            VX_MUT(unsigned int, words)[(bh * (N_) + (pos)) * (D * (BITS) / 32) + w_] = word_; \
        }                                                                                  \
        if (tid == 0) VX_MUT(NDT, norms)[bh * (N_) + (pos)] = vx_from_float<NDT>(nrm_);    \
    } while (0)
"""

DECODE = r"""
    // Template: R query heads per KV head, D = head_dim, T tokens per block, CPT coordinates
    // per thread, KB/VB key/value bits, KSH/VSH one codebook for every coordinate and head,
    // KPAIR/VPAIR that codebook's levels exact in fp16 (pair tables), PSAME the values' pair
    // table is the keys', PF tokens loaded ahead per thread, MG splits per first-level merge,
    // ROTATE, FINISH, HAS_SINKS, OT, APPEND and NDT the norms' type (see the module doc).
    constexpr int NT = 128;
    constexpr int NWARPS = NT / 32;
    static_assert(NT % D == 0, "a thread's elements of the [R, D] rows share one coordinate, tid % D");
#ifndef VX_MMA
    constexpr int LPT = D / CPT;                // CUDA-core passes: lanes per token,
    constexpr int TL = NT / LPT;                // token lanes,
    constexpr int KWT = CPT * KB / 32, VWT = CPT * VB / 32;  // words per thread and token
#endif
    constexpr int WK = D * KB / 32, WV = D * VB / 32;        // words per token
    constexpr int KNL = 1 << KB, VNL = 1 << VB;              // levels per codebook
#ifdef VX_MMA
    constexpr bool KP = KPAIR, VP = VPAIR, VPK = VPAIR && PSAME;  // pair tables: tensor cores only
#else
    constexpr bool KP = false, VP = false, VPK = false;
#endif
    constexpr int KTAB = KP ? 32 << (2 * KB) : KSH ? KNL * 32 : (D / 8) * (8 * KNL + 1);
    constexpr int VTAB = VPK ? 0 : VP ? 32 << (2 * VB) : VSH ? VNL * 32 : (D / 8) * (8 * VNL + 1);
    constexpr int RED = NWARPS * R * D;         // pass 3's cross-warp reduction
    constexpr float INV_SQRT_D = D == 128 ? 0.08838834764831845f : 0.125f;
    constexpr int QROWS = 2 * R * D + R + R * D / 32;  // query rows, q·mean, dense rotation's copy, q·mean partials
    constexpr int PS1 = R * T > QROWS ? R * T : QROWS;
    constexpr int PS0 = APPEND && PS1 < 2 * D + NWARPS ? 2 * D + NWARPS : PS1;  // APPEND's scratch
    constexpr int PS = PS0 > RED - KTAB - VTAB ? PS0 : RED - KTAB - VTAB;
    // [key table | value table | query rows, then scores, then probabilities]: one array so
    // that the reduction and the merge can reuse all of it, its last word the merge's flag once
    // the reduction is read (CUDA: 48 KiB of static shared memory per block, Metal: 32 KiB).
    VX_SHARED float smem[KTAB + VTAB + PS];
    VX_SHARED_PTR float* kt = smem;
    VX_SHARED_PTR float* vt = VPK ? smem : smem + KTAB;
    VX_SHARED_PTR float* ps = smem + KTAB + VTAB;
    VX_SHARED_PTR int* last_block = (VX_SHARED_PTR int*)(smem + KTAB + VTAB + PS - 1);

    const float NEG_INF = VX_NEG_INF;
    const int tid = VX_THREAD_IDX, lane = tid % 32, warp = tid / 32;
    static_assert(!APPEND || (ROTATE && FINISH), "APPEND: the whole step in one launch");
    const int n_split = VX_GRID_DIM(x);
    // APPEND: the last split holds only the step's new token, which it encodes into the buffers
    // first (slot coded − 1; the other splits stop short of it), and it is the grid's first block
    const int split = APPEND ? (VX_BLOCK_IDX(x) + n_split - 1) % n_split : VX_BLOCK_IDX(x);
    const bool new_token = APPEND && split == n_split - 1;
    const int h = VX_BLOCK_IDX(y), n_kv = VX_GRID_DIM(y);
    const int b = VX_BLOCK_IDX(z);
    const int N = kn_shape[2];                  // allocated tokens: the buffers' stride
    const int coded = count_shape[0];           // coded tokens (an input's length: no host->device copy)
    const int n = APPEND && !new_token ? coded - 1 : coded;  // this block's end
    const int t0 = new_token ? coded - 1 : split * T;
    const size_t bh = (size_t)b * n_kv + h;
    // the splits' partials in a scratch input written in place (an output costs MLX an allocation
    // and ~1 µs of CPU per launch): max and Σ exp [B, H, n_split, 2, R], then value sums [.., R, D]
    // (the sums 16-byte aligned for the merge's 4-float loads)
    VX_GLOBAL float* split_ml = VX_MUT(float, scratch);
    VX_GLOBAL float* split_acc = split_ml + (((size_t)VX_GRID_DIM(z) * n_kv * n_split * 2 * R + 3) & ~(size_t)3);

    // token t's NW words (from word WOFF of the token) into wdst and its norm into ndst; zeros past n
    #define VX_LOAD_TOKEN(words, norms, wdst, ndst, NW, WTOK, WOFF, t) do {                   \
        const int t_ = (t);                                                                \
        if (t_ < n) {                                                                      \
            VX_LOAD_WORDS((words) + (bh * N + t_) * (WTOK) + (WOFF), wdst, NW);            \
            ndst = vx_to_float((norms)[bh * N + t_]);                                      \
        } else {                                                                           \
            for (int w_ = 0; w_ < (NW); w_++) (wdst)[w_] = 0u;                             \
            ndst = 0.f;                                                                    \
        }                                                                                  \
    } while (0)
#ifdef VX_MMA
    // Tensor-core passes: each warp takes 16-token tiles (warp, warp + NWARPS, ...) with PFT tiles'
    // loads in flight in a ring: NTOK tokens per lane, token u (u_ in TOK) of a tile, NW words
    // from word WOFF of each, and its norm; zeros past n.
    #define VX_LOAD_TILE(words, norms, wbuf, nbuf, NW, WTOK, WOFF, NTOK, TOK, tile) do {          \
        _Pragma("unroll")                                                                  \
        for (int u_ = 0; u_ < (NTOK); u_++)                                                \
            VX_LOAD_TOKEN(words, norms, (wbuf)[u_], (nbuf)[u_], NW, WTOK, WOFF, t0 + (tile) * 16 + (TOK)); \
    } while (0)
    // the ring's first PFT tiles, loaded before the pass (ahead of work that does not need them)
    #define VX_START_TILES(words, norms, ring, nring, NW, WTOK, WOFF, NTOK, TOK) do {          \
        _Pragma("unroll")                                                                  \
        for (int p_ = 0; p_ < PFT; p_++)                                                   \
            VX_LOAD_TILE(words, norms, ring[p_], nring[p_], NW, WTOK, WOFF, NTOK, TOK, warp + p_ * NWARPS); \
    } while (0)
    // the loop over this warp's tiles, running the body (...) with w, nm holding tile `tile` while
    // ring slot p_ loads the tile PFT on
    #define VX_FOR_TILES(words, norms, ring, nring, NW, WTOK, WOFF, NTOK, TOK, ...) do {       \
        _Pragma("unroll 1")                                                                \
        for (int i0 = 0; i0 < TB / 16 / NWARPS; i0 += PFT) {                              \
            _Pragma("unroll")                                                              \
            for (int p_ = 0; p_ < PFT; p_++) {                                             \
                const int tile = warp + (i0 + p_) * NWARPS;                                \
                unsigned int w[NTOK][NW];                                                  \
                float nm[NTOK];                                                            \
                _Pragma("unroll")                                                          \
                for (int u_ = 0; u_ < (NTOK); u_++) {                                      \
                    nm[u_] = nring[p_][u_];                                                \
                    for (int w_ = 0; w_ < (NW); w_++) w[u_][w_] = ring[p_][u_][w_];        \
                }                                                                          \
                if (tile + PFT * NWARPS < TB / 16)                                         \
                    VX_LOAD_TILE(words, norms, ring[p_], nring[p_], NW, WTOK, WOFF, NTOK, TOK, tile + PFT * NWARPS); \
                __VA_ARGS__                                                                \
            }                                                                              \
        }                                                                                  \
    } while (0)
    constexpr int PFT = T / 64 < 2 ? T / 64 : 2;    // tiles in flight per warp (of T / 64); 4: two waves at 64k (145 registers)
    const int TB = new_token ? 16 * NWARPS * PFT : T;  // the block's tokens: the new token's, one round of tiles
    const int g = lane >> 2, c = lane & 3;      // an mma lane: its group and its thread in the group
    constexpr int KC = D / 4, KWC = KC * KB / 32;                                     // scores pass
    constexpr int VC = D / 8, VBITS = VC * VB, VWC = VBITS < 32 ? 1 : VBITS / 32;     // values pass
    // the keys' ring of tiles in flight, started after the query rotation (started before the
    // tables, every block's tile loads delayed the query's reads: 48 -> 42 µs at 32k, pipelined)
    unsigned int kring[PFT][2][KWC];
    float knring[PFT][2];
    #define VX_TAB_PUT(tab, i, x) (((VX_SHARED_PTR unsigned int*)(tab))[i] = vx_hilo(x))  // tensor cores: fp16 hi, lo
#else
    #define VX_TAB_PUT(tab, i, x) ((tab)[i] = (x))
#endif
    // The query's global reads, issued together before the tables (one round trip, where
    // the rotation's three reads in turn took ~3 µs): this thread's elements i = tid + j·NT
    // of the [R, D] rows, and its coordinate tid % D of the rotation's tables.
    constexpr int QPT = (R * D + NT - 1) / NT;
    float qv[QPT];
    #pragma unroll
    for (int j = 0; j < QPT; j++) qv[j] = tid + j * NT < R * D ? vx_to_float(q[bh * R * D + tid + j * NT]) : 0.f;
    const float qsg = ROTATE && HAD ? rot[h * D + tid % D] : 1.f;
    const float qkm = ROTATE ? k_mean[h * D + tid % D] : 0.f;
    const float qks = ROTATE ? k_scale[h * D + tid % D] : 1.f;
    const float qsm = ROTATE ? softmax_scale[0] : 1.f;
    if (APPEND && new_token) {
        // the step's key and value into the buffers (ps as scratch: the query rows come later),
        // visible to this block's loads below. rot holds R_k (or its signs), rot_t R_vᵀ.
        VX_SHARED_PTR float* xs = ps;
        VX_SHARED_PTR unsigned int* cs = (VX_SHARED_PTR unsigned int*)(ps + D);
        VX_SHARED_PTR float* red = ps + 2 * D;
        VX_ENCODE(kx, k_mean, rot, D, 1, k_scale, k_levels, kw, kn, N, KB, HAD, xs, cs, red, coded - 1);
        VX_BARRIER();
        VX_ENCODE(vx, v_mean, rot_t, 1, D, v_scale, v_levels, vw, vn, N, VB, HAD, xs, cs, red, coded - 1);
        VX_DEVICE_FENCE();
        VX_BARRIER();
    }
#ifdef VX_MMA
    // Pair tables: entry e, two codes (the first in the low BITS bits), holds both levels as
    // fp16 in one word, the mma's operand as is: one lookup for two codes, no hi/lo halves (the
    // levels are exact in fp16). 32 copies of each entry, one per lane (random codes would
    // collide on banks), written 4 words at a time; unrolled, so that the levels' reads go out together.
    #define VX_PAIR_FILL(tab, levels, BITS) do {                                                \
        _Pragma("unroll")                                                                  \
        for (int k_ = 0; k_ < (8 << (2 * (BITS))) / NT; k_++) {                            \
            const int i_ = tid + k_ * NT, e_ = i_ >> 3;                                     \
            const unsigned int x_ = vx_half2((levels)[e_ & ((1 << (BITS)) - 1)], (levels)[e_ >> (BITS)]); \
            reinterpret_cast<VX_SHARED_PTR uint4*>(tab)[i_] = make_uint4(x_, x_, x_, x_);   \
        }                                                                                  \
    } while (0)
    if (KP) VX_PAIR_FILL(kt, k_levels, KB);
    if (VP && !VPK) VX_PAIR_FILL(vt, v_levels, VB);
    #undef VX_PAIR_FILL
#endif
    for (int i = tid; i < (KP ? 0 : KSH ? KNL * 32 : D * KNL); i += NT) {
        if (KSH) VX_TAB_PUT(kt, i, k_levels[i / 32]);  // head 0, coordinate 0: all the same
        else VX_TAB_PUT(kt, (i / KNL / 8) * (8 * KNL + 1) + (i / KNL % 8) * KNL + i % KNL, k_levels[(size_t)h * D * KNL + i]);
    }
    for (int i = tid; i < (VP ? 0 : VSH ? VNL * 32 : D * VNL); i += NT) {
        if (VSH) VX_TAB_PUT(vt, i, v_levels[i / 32]);
        else VX_TAB_PUT(vt, (i / VNL / 8) * (8 * VNL + 1) + (i / VNL % 8) * VNL + i % VNL, v_levels[(size_t)h * D * VNL + i]);
    }
    #undef VX_TAB_PUT

    // 0. the group's query rows in the key basis: qb [R, D] and q·mean [R], in ps for now
    VX_SHARED_PTR float* qb = ps;
    VX_SHARED_PTR float* qmb = ps + R * D;
    if (ROTATE) {
        // HAD: R_k = diag(signs)·H/√D (turboquant's randomized Hadamard), rot holds the signs
        // [H, D] and q @ R_k is a Walsh-Hadamard transform in shared memory, in place: no D×D
        // matrix read by every block.
        VX_SHARED_PTR float* qs = ps + R * D + R;       // the dense rotation's raw rows
        VX_SHARED_PTR float* qmp = ps + 2 * R * D + R;  // q·mean per 32 coordinates
        #pragma unroll
        for (int j = 0; j < QPT; j++) {
            const int i = tid + j * NT;
            float a = qv[j] * qkm;              // q·mean, from the raw rows: a warp's lanes share a row (D >= 32)
            for (int off = 16; off > 0; off >>= 1) a += VX_SHFL_XOR(a, off);
            if (i < R * D) {
                if (lane == 0) qmp[i / 32] = a;
                if (HAD) qb[i] = qv[j] * qsg;
                else qs[i] = qv[j];
            }
        }
        VX_BARRIER();
        if (HAD) {
            VX_FWHT(qb, R);
            #pragma unroll
            for (int j = 0; j < QPT; j++) {
                if (tid + j * NT < R * D) qb[tid + j * NT] *= qsm * INV_SQRT_D * qks;
            }
        } else {
            for (int d = tid; d < D; d += NT) { // one column per thread (d = tid), every row at once
                float a[R];
                for (int r = 0; r < R; r++) a[r] = 0.f;
                #pragma unroll 16
                for (int k = 0; k < D; k++) {   // unrolled: 16 loads in flight, not one L2 round trip per k
                    const float m = rot[((size_t)h * D + k) * D + d];
                    #pragma unroll
                    for (int r = 0; r < R; r++) a[r] += qs[r * D + k] * m;
                }
                for (int r = 0; r < R; r++) qb[r * D + d] = a[r] * qsm * qks;
            }
        }
        if (tid < R) {
            float a = 0.f;
            for (int k = 0; k < D / 32; k++) a += qmp[tid * (D / 32) + k];
            qmb[tid] = a * qsm;
        }
    } else {
        #pragma unroll
        for (int j = 0; j < QPT; j++) {
            if (tid + j * NT < R * D) qb[tid + j * NT] = qv[j];
        }
        if (tid < R) qmb[tid] = q_mean[bh * R + tid];
    }
    VX_BARRIER();

    // code j of this thread's words wd; the level of code c of coordinate d in table tab
    #define VX_CODE(wd, j, BITS) (((wd)[(j) * (BITS) / 32] >> (((j) * (BITS)) % 32)) & ((1u << (BITS)) - 1u))
    #define VX_LV(tab, SH, NL, d, c) \
        (SH ? (tab)[((c) << 5) | lane] : (tab)[((d) / 8) * (8 * (NL) + 1) + ((d) % 8) * (NL) + (c)])
#ifdef VX_MMA
    // code c of coordinate d as fp16 (hi, lo) in one word (VX_TAB_PUT), from table tab
    #define VX_HL(tab, SH, NL, d, c) (((VX_SHARED_PTR unsigned int*)(tab))[SH ? (((c) << 5) | lane) : ((d) / 8) * (8 * (NL) + 1) + ((d) % 8) * (NL) + (c)])
    // VX_HL of code j of words wd. A lane-replicated table's byte offset, ((code << 5) | lane)·4,
    // comes straight from the word: one shift, then one LOP3 for the mask and the lane (the
    // passes are instruction-bound: 2 instructions per code where VX_CODE + VX_HL took 3; ptxas
    // adds one more for the table base when it keeps the base out of a uniform register)
    #define VX_SHIFT_TO(x, from, to) ((from) <= (to) ? (x) << ((from) <= (to) ? (to) - (from) : 0) : (x) >> ((from) > (to) ? (from) - (to) : 0))
    #define VX_HLW(tab, SH, NL, d, wd, j, BITS) (SH ? \
        *(VX_SHARED_PTR unsigned int*)((VX_SHARED_PTR char*)(tab) + ((VX_SHIFT_TO((wd)[(j) * (BITS) / 32], ((j) * (BITS)) % 32, 7) & ((NL - 1u) << 7)) | lane4)) : \
        VX_HL(tab, SH, NL, d, VX_CODE(wd, j, BITS)))
    const unsigned int lane4 = (unsigned int)lane << 2;
    VX_START_TILES(kw, kn, kring, knring, KWC, WK, c * KWC, 2, g + 8 * u_);
    // the pair-table entry of field f (2·BITS bits from bit 2·BITS·f) of the word x: byte offset (e << 7) | lane·4
    #define VX_PAIRW(tab, x, f, BITS) *(VX_SHARED_PTR unsigned int*)((VX_SHARED_PTR char*)(tab) + \
        ((VX_SHIFT_TO((x), (f) * 2 * (BITS), 7) & (((1u << (2 * (BITS))) - 1u) << 7)) | lane4))

    // 1. scores on tensor cores: S [16 tokens, 8 query rows] += K [16 tokens, 16 coordinates] ·
    // Q'ᵀ [16 coordinates, 8 rows] per k-tile (vx_mma), K's levels from a pair table (one mma)
    // or as fp16 hi + lo (two).
    // Lane (g, c) holds tokens g and g + 8 of a tile and coordinates [c·D/4, (c + 1)·D/4) of each
    // (one load per token); k-tile kk takes the coordinates 4kk … 4kk + 3 of each lane's range
    // (the sum runs over the coordinates in any order, so Q' is laid out the same way).
    {
        unsigned int qf[D / 16][2];             // Q' fragments: row g, coordinates c·KC + 4kk + {0, 1}, {2, 3}
        #pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const int d0 = g * D + c * KC + 4 * kk;
            qf[kk][0] = g < R ? vx_half2(qb[d0], qb[d0 + 1]) : 0u;
            qf[kk][1] = g < R ? vx_half2(qb[d0 + 2], qb[d0 + 3]) : 0u;
        }
        const float qm0 = 2 * c < R ? qmb[2 * c] : 0.f, qm1 = 2 * c + 1 < R ? qmb[2 * c + 1] : 0.f;
        VX_BARRIER();                           // ps now holds scores
        VX_FOR_TILES(kw, kn, kring, knring, KWC, WK, c * KWC, 2, g + 8 * u_, {
            float sc[4] = {0.f, 0.f, 0.f, 0.f};
            _Pragma("unroll")
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned int hi[4], lo[4];      // [i]: token g + 8·(i % 2), coordinates 4kk + 2·(i / 2) + {0, 1}
                _Pragma("unroll")
                for (int i = 0; i < 4; i++) {
                    const int j = 4 * kk + 2 * (i / 2);
                    if (KP) {                   // the pair (j, j + 1) is field j / 2 of the lane's words
                        hi[i] = VX_PAIRW(kt, w[i % 2][j * KB / 32], (j / 2) % (16 / KB), KB);
                    } else {
                        const unsigned int x = VX_HLW(kt, KSH, KNL, c * KC + j, w[i % 2], j, KB);
                        const unsigned int y = VX_HLW(kt, KSH, KNL, c * KC + j + 1, w[i % 2], j + 1, KB);
                        hi[i] = __byte_perm(x, y, 0x5410);
                        lo[i] = __byte_perm(x, y, 0x7632);
                    }
                }
                vx_mma(sc, hi, qf[kk]);
                if (!KP) vx_mma(sc, lo, qf[kk]);
            }
            const int ti = tile * 16 + g;       // sc: tokens ti (sc[0], sc[1]) and ti + 8, rows 2c and 2c + 1
            if (2 * c < R) {
                ps[2 * c * T + ti] = t0 + ti < n ? sc[0] * nm[0] + qm0 : NEG_INF;
                ps[2 * c * T + ti + 8] = t0 + ti + 8 < n ? sc[2] * nm[1] + qm0 : NEG_INF;
            }
            if (2 * c + 1 < R) {
                ps[(2 * c + 1) * T + ti] = t0 + ti < n ? sc[1] * nm[0] + qm1 : NEG_INF;
                ps[(2 * c + 1) * T + ti + 8] = t0 + ti + 8 < n ? sc[3] * nm[1] + qm1 : NEG_INF;
            }
        });
    }
#else
    const int lt = tid % LPT;                   // this thread's slice of a token
    const int cb = lt * CPT;                    // its first coordinate
    const int tl = tid / LPT;
    const int TB = new_token ? PF * TL : T;     // the block's tokens: the new token's, one batch
    // Macros, not functions: Metal has no lambdas, and a function would need the tables' and
    // registers' address spaces spelled per backend.
    // PF tokens' words (NW per thread, WTOK per token) and norms, from batch i0 on: zeros past n
    #define VX_LOAD_BATCH(words, norms, wbuf, nbuf, NW, WTOK, i0) do {                        \
        _Pragma("unroll")                                                                  \
        for (int p_ = 0; p_ < PF; p_++)                                                    \
            VX_LOAD_TOKEN(words, norms, (wbuf)[p_], (nbuf)[p_], NW, WTOK, lt * (NW), t0 + tl + ((i0) + p_) * TL); \
    } while (0)
    // wd, nm := the loaded batch (nwd, nnm); then start loading the batch after it
    #define VX_NEXT_BATCH(words, norms, NW, WTOK) do {                                        \
        _Pragma("unroll")                                                                  \
        for (int p_ = 0; p_ < PF; p_++) {                                                  \
            nm[p_] = nnm[p_];                                                              \
            for (int w_ = 0; w_ < (NW); w_++) wd[p_][w_] = nwd[p_][w_];                    \
        }                                                                                  \
        if (i0 + PF < TB / TL) VX_LOAD_BATCH(words, norms, nwd, nnm, NW, WTOK, i0 + PF);   \
    } while (0)
    // the level of code c of this thread's coordinate j (0 <= j < CPT)
    #define VX_LEVEL(tab, SH, NL, j, c) VX_LV(tab, SH, NL, cb + (j), c)

    // 1. scores
    {
        float qr[R][CPT];
        float qm[R];
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < CPT; j++) qr[r][j] = qb[r * D + cb + j];
            qm[r] = qmb[r];
        }
        VX_BARRIER();                           // ps now holds scores
        unsigned int nwd[PF][KWT];              // the next batch's words and norms: loads in
        float nnm[PF];                          // flight while the current batch is scored
        VX_LOAD_BATCH(kw, kn, nwd, nnm, KWT, WK, 0);
        #pragma unroll 1
        for (int i0 = 0; i0 < TB / TL; i0 += PF) {
            unsigned int wd[PF][KWT];
            float nm[PF];
            VX_NEXT_BATCH(kw, kn, KWT, WK);
            #pragma unroll
            for (int p = 0; p < PF; p++) {
                float acc[R];
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r] = 0.f;
                #pragma unroll
                for (int j = 0; j < CPT; j++) {
                    const float lv = VX_LEVEL(kt, KSH, KNL, j, VX_CODE(wd[p], j, KB));
                    #pragma unroll
                    for (int r = 0; r < R; r++) acc[r] += qr[r][j] * lv;
                }
                #pragma unroll
                for (int off = LPT / 2; off > 0; off >>= 1) {
                    #pragma unroll
                    for (int r = 0; r < R; r++) acc[r] += VX_SHFL_XOR(acc[r], off);
                }
                const int ti = tl + (i0 + p) * TL;
                if (lt == 0) {
                    #pragma unroll
                    for (int r = 0; r < R; r++) ps[r * T + ti] = t0 + ti < n ? acc[r] * nm[p] + qm[r] : NEG_INF;
                }
            }
        }
    }
#endif
    VX_BARRIER();
#ifdef VX_MMA
    // the values' first tiles load while the softmax statistics are computed
    unsigned int vring[PFT][4][VWC];
    float vnring[PFT][4];
    VX_START_TILES(vw, vn, vring, vnring, VWC, WV, g * VBITS / 32, 4, 2 * c + (u_ & 1) + 8 * (u_ >> 1));
#endif

    // 2. softmax statistics of this split, one warp per query head
    for (int r = warp; r < R; r += NWARPS) {
        float m = NEG_INF;
        for (int i = lane; i < TB; i += 32) m = VX_MAX(m, ps[r * T + i]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = VX_MAX(m, VX_SHFL_XOR(m, off));
        float l = 0.f;
        for (int i = lane; i < TB; i += 32) {
            const float s = ps[r * T + i];
            const float p = s == NEG_INF ? 0.f : VX_EXP(s - m);
            ps[r * T + i] = p;
            l += p;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += VX_SHFL_XOR(l, off);
        if (lane == 0) {
            split_ml[((bh * n_split + split) * 2 + 0) * R + r] = m;
            split_ml[((bh * n_split + split) * 2 + 1) * R + r] = l;
        }
    }
    VX_BARRIER();

    // 3. values: Σ p · norm · levels[code] per coordinate
#ifdef VX_MMA
    // On tensor cores: O [16 coordinates, 8 rows] += V [16 coordinates, 16 tokens] · (p·norm)ᵀ
    // [16 tokens, 8 rows] per m-tile, V's levels from a pair table or as fp16 hi + lo. Lane
    // (g, c) holds tokens 2c, 2c + 1, 2c + 8, 2c + 9 of a tile and coordinates [g·D/8,
    // (g + 1)·D/8) of each; m-tile mt takes coordinates 2mt (fragment row g) and 2mt + 1 (row
    // g + 8) of each lane's range.
    {
        const int vsh = VBITS < 32 ? g * VBITS % 32 : 0;  // 16-bit ranges: a shift inside the word
        float o[D / 16][4];                     // rows g·VC + 2mt, + 1; columns (query rows) 2c, 2c + 1
        #pragma unroll
        for (int mt = 0; mt < D / 16; mt++) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
        VX_FOR_TILES(vw, vn, vring, vnring, VWC, WV, g * VBITS / 32, 4, 2 * c + (u_ & 1) + 8 * (u_ >> 1), {
            if (VBITS < 32) {
                _Pragma("unroll")
                for (int u = 0; u < 4; u++) w[u][0] >>= vsh;
            }
            unsigned int pb[2] = {0u, 0u};      // (p·norm)ᵀ fragment: tokens 2c, 2c + 1 | 2c + 8, 2c + 9; row g
            if (g < R) {
                const int ti = g * T + tile * 16 + 2 * c;
                pb[0] = vx_half2(ps[ti] * nm[0], ps[ti + 1] * nm[1]);
                pb[1] = vx_half2(ps[ti + 8] * nm[2], ps[ti + 9] * nm[3]);
            }
            // pair tables: the codes of tokens u and u + 1 interleaved, field i of word k of pw[u / 2][0]
            // (of pw[u / 2][1]) holding coordinate 2i (2i + 1) of word k of both
            constexpr unsigned int LOW = VB == 4 ? 0x0F0F0F0Fu : 0x33333333u;  // the first code of each field
            unsigned int pw[2][2][VWC];
            _Pragma("unroll")
            for (int k = 0; k < (VP ? VWC : 0); k++) {
                _Pragma("unroll")
                for (int u = 0; u < 4; u += 2) {
                    pw[u / 2][0][k] = (w[u][k] & LOW) | ((w[u + 1][k] << VB) & ~LOW);
                    pw[u / 2][1][k] = ((w[u][k] >> VB) & LOW) | (w[u + 1][k] & ~LOW);
                }
            }
            _Pragma("unroll")
            for (int mt = 0; mt < D / 16; mt++) {
                unsigned int hi[4], lo[4];      // [i]: coordinate 2mt + i % 2, tokens u = 2·(i / 2) and u + 1
                _Pragma("unroll")
                for (int i = 0; i < 4; i++) {
                    const int j = 2 * mt + i % 2, u = 2 * (i / 2);
                    if (VP) {                   // coordinate 2mt: field mt of the pair words
                        hi[i] = VX_PAIRW(vt, pw[i / 2][i % 2][mt / (16 / VB)], mt % (16 / VB), VB);
                    } else {
                        const unsigned int x = VX_HLW(vt, VSH, VNL, g * VC + j, w[u], j, VB);
                        const unsigned int y = VX_HLW(vt, VSH, VNL, g * VC + j, w[u + 1], j, VB);
                        hi[i] = __byte_perm(x, y, 0x5410);
                        lo[i] = __byte_perm(x, y, 0x7632);
                    }
                }
                vx_mma(o[mt], hi, pb);
                if (!VP) vx_mma(o[mt], lo, pb);
            }
        });
        VX_BARRIER();  // every thread is done with the tables and probabilities: smem becomes the reduction buffer
        #pragma unroll
        for (int mt = 0; mt < D / 16; mt++) {
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = 2 * c + i % 2, d = g * VC + 2 * mt + i / 2;
                if (r < R) smem[(warp * R + r) * D + d] = o[mt][i];
            }
        }
    }
#else
    // in registers
    float acc[R][CPT];
    #pragma unroll
    for (int r = 0; r < R; r++) {
        #pragma unroll
        for (int j = 0; j < CPT; j++) acc[r][j] = 0.f;
    }
    unsigned int nwd[PF][VWT];
    float nnm[PF];
    VX_LOAD_BATCH(vw, vn, nwd, nnm, VWT, WV, 0);  // out of range: probability 0 (pass 2), norm 0
    #pragma unroll 1
    for (int i0 = 0; i0 < TB / TL; i0 += PF) {
        unsigned int wd[PF][VWT];
        float nm[PF];
        VX_NEXT_BATCH(vw, vn, VWT, WV);
        #pragma unroll
        for (int p = 0; p < PF; p++) {
            const int ti = tl + (i0 + p) * TL;
            float pr[R];
            #pragma unroll
            for (int r = 0; r < R; r++) pr[r] = ps[r * T + ti] * nm[p];
            #pragma unroll
            for (int j = 0; j < CPT; j++) {
                const float lv = VX_LEVEL(vt, VSH, VNL, j, VX_CODE(wd[p], j, VB));
                #pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] += pr[r] * lv;
            }
        }
    }
    #undef VX_LEVEL
    #undef VX_LOAD_BATCH
    #undef VX_NEXT_BATCH
    // token lanes sharing coordinates: first inside the warp (lanes LPT apart), then across warps
    #pragma unroll
    for (int off = LPT; off < 32; off <<= 1) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < CPT; j++) acc[r][j] += VX_SHFL_XOR(acc[r][j], off);
        }
    }
    VX_BARRIER();  // every thread is done with the tables and probabilities: smem becomes the reduction buffer
    if (lane < LPT) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            #pragma unroll
            for (int j = 0; j < CPT; j++) smem[(warp * R + r) * D + cb + j] = acc[r][j];
        }
    }
#endif
    #undef VX_CODE
    #undef VX_LV
    #undef VX_LOAD_TOKEN
#ifdef VX_MMA
    #undef VX_LOAD_TILE
    #undef VX_FOR_TILES
    #undef VX_START_TILES
    #undef VX_HL
    #undef VX_HLW
    #undef VX_SHIFT_TO
    #undef VX_PAIRW
#endif
    VX_BARRIER();
    for (int e = tid; e < R * D; e += NT) {
        float s = 0.f;
        #pragma unroll
        for (int k = 0; k < NWARPS; k++) s += smem[k * R * D + e];
        split_acc[(bh * n_split + split) * R * D + e] = s;
    }

    // 4. the merge, in two levels so that the last block's tail is short: the last block of each
    // group of MG (a template argument) splits to finish merges the group's partials into the
    // group's first slot, and the last group to be merged merges the groups' (a single group:
    // the splits, to the output)
    const int n_group = (n_split + MG - 1) / MG, grp = split / MG;
    const int nbh = n_kv * VX_GRID_DIM(z);
    VX_DEVICE_FENCE();                          // this block's partials, visible to the merging block
    VX_BARRIER();
    int first = n_group == 1 ? 0 : grp * MG;    // the partials to merge: slots first + k·stride, k < nmerge
    int nmerge = n_group == 1 ? n_split : (n_split - first < MG ? n_split - first : MG), stride = 1;
    const VX_GLOBAL unsigned int* cnt = counter + (n_group == 1 ? bh : nbh + bh * n_group + grp);
    if (tid == 0) *last_block = VX_ATOMIC_INC(cnt) == (unsigned int)(nmerge - 1);
    VX_BARRIER();
    if (!*last_block) return;
    if (tid == 0) VX_ATOMIC_RESET(cnt);         // every block has counted: zero for the next launch
    // the output's per-coordinate tables, read now so that their round trip overlaps the merge
    const float vsc = FINISH && HAD ? v_scale[h * D + tid % D] : 0.f;
    const float vsg = FINISH && HAD ? rot_t[h * D + tid % D] : 0.f;
    const float vmn = FINISH ? v_mean[h * D + tid % D] : 0.f;
    VX_DEVICE_FENCE();
    VX_SHARED_PTR float* top = smem;            // per query head: max over splits,
    VX_SHARED_PTR float* sum = smem + R;        // Σ exp, rescale for a sink logit, denominator
    VX_SHARED_PTR float* scale_a = smem + 2 * R;
    VX_SHARED_PTR float* denom = smem + 3 * R;
    VX_SHARED_PTR float* ys = smem + 4 * R;     // merged value sums [R, D]
    VX_GLOBAL float* pml = split_ml + bh * n_split * 2 * R;
    VX_GLOBAL float* pacc = split_acc + bh * n_split * R * D;
    for (;;) {
        // Online: each thread's four coordinates (16-byte loads) and its row's max and Σ exp, MB
        // partials' loads issued together (no branch between them: indices clamped, weights 0)
        constexpr int MB = 8;
        for (int e = 4 * tid; e < R * D; e += 4 * NT) {
            const int r = e / D;
            float m = NEG_INF, l = 0.f, a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            for (int s0 = 0; s0 < nmerge; s0 += MB) {
                float4 v[MB];
                float ms[MB], ls[MB];
                #pragma unroll
                for (int j = 0; j < MB; j++) {
                    const int slot = first + (s0 + j < nmerge ? s0 + j : nmerge - 1) * stride;
                    v[j] = VX_LOAD_CG4(pacc + (size_t)slot * R * D + e);
                    ms[j] = VX_LOAD_CG(pml + slot * 2 * R + r);
                    ls[j] = VX_LOAD_CG(pml + slot * 2 * R + R + r);
                }
                float mb = m;
                #pragma unroll
                for (int j = 0; j < MB; j++) mb = VX_MAX(mb, ms[j]);
                const float sc = m == NEG_INF ? 0.f : VX_EXP(m - mb);
                l *= sc;
                a0 *= sc;
                a1 *= sc;
                a2 *= sc;
                a3 *= sc;
                #pragma unroll
                for (int j = 0; j < MB; j++) {
                    const float w = s0 + j < nmerge ? VX_EXP(ms[j] - mb) : 0.f;
                    l += ls[j] * w;
                    a0 += v[j].x * w;
                    a1 += v[j].y * w;
                    a2 += v[j].z * w;
                    a3 += v[j].w * w;
                }
                m = mb;
            }
            ys[e] = a0;
            ys[e + 1] = a1;
            ys[e + 2] = a2;
            ys[e + 3] = a3;
            if (e % D == 0) {
                top[r] = m;
                sum[r] = l;
            }
        }
        VX_BARRIER();
        if (n_group == 1 || stride == MG) break;
        // a group merged: its partial into the group's first slot, then the groups' merge
        for (int e = tid; e < R * D; e += NT) pacc[(size_t)first * R * D + e] = ys[e];
        if (tid < 2 * R) pml[first * 2 * R + tid] = tid < R ? top[tid] : sum[tid - R];
        VX_DEVICE_FENCE();
        VX_BARRIER();
        if (tid == 0) *last_block = VX_ATOMIC_INC(counter + bh) == (unsigned int)(n_group - 1);
        VX_BARRIER();
        if (!*last_block) return;
        if (tid == 0) VX_ATOMIC_RESET(counter + bh);
        VX_DEVICE_FENCE();
        first = 0;
        nmerge = n_group;
        stride = MG;
    }
    if (tid < R) {                              // a: rescale of the coded terms when a sink logit is the max
        float a = 1.f, dn = sum[tid];
        if (HAS_SINKS) {                        // a sink logit is a key with no value
            const float sink = vx_to_float(sinks[h * R + tid]);
            const float new_top = VX_MAX(top[tid], sink);
            a = VX_EXP(top[tid] - new_top);
            dn = sum[tid] * a + VX_EXP(sink - new_top);
        }
        scale_a[tid] = a;
        denom[tid] = dn;
    }
    VX_BARRIER();
    if (FINISH) {
        if (HAD) {                              // R_vᵀ = H·diag(signs)/√D, rot_t holds the signs
            for (int i = tid; i < R * D; i += NT) ys[i] *= vsc;
            VX_BARRIER();
            VX_FWHT(ys, R);
        }
        for (int d = tid; d < D; d += NT) {     // out[r, d] = Σ_k ys[r, k] s_v[k] R_v[d, k] (one column per thread)
            float o[R];
            if (HAD) {
                for (int r = 0; r < R; r++) o[r] = ys[r * D + d] * vsg * INV_SQRT_D;  // d = tid: D <= NT
            } else {
                for (int r = 0; r < R; r++) o[r] = 0.f;
                #pragma unroll 16
                for (int k = 0; k < D; k++) {
                    const float m = rot_t[((size_t)h * D + k) * D + d] * v_scale[h * D + k];
                    #pragma unroll
                    for (int r = 0; r < R; r++) o[r] += ys[r * D + k] * m;
                }
            }
            for (int r = 0; r < R; r++) {       // sum[r]: probability mass on coded tokens, for the mean
                const float y = scale_a[r] * (o[r] + sum[r] * vmn);
                out[(bh * R + r) * D + d] = vx_from_float<OT>(y / VX_MAX(denom[r], 1e-30f));
            }
        }
    } else {                                    // merged partial: reference.attend adds the fp16 regions
        for (int e = tid; e < R * D; e += NT) out[bh * R * D + e] = vx_from_float<OT>(ys[e]);
        if (tid < R) {
            ml_out[bh * 2 * R + tid] = top[tid];
            ml_out[bh * 2 * R + R + tid] = sum[tid];
        }
    }
"""

APPEND = r"""
    // Template: D = head_dim, KB/VB key/value bits (dividing 32), KHAD/VHAD Walsh-Hadamard
    // rotations (k_rot/v_rot then hold the signs [H, D]), NDT the norms' type. One block per
    // (batch, KV head, K or V); the token goes to slot slot_shape[0] − 1 of the cache buffers,
    // written in place. ``chain`` (unused) and ``done`` order it between decode launches
    // (fused.FusedDecode.append).
    constexpr int NT = 128;
    constexpr int NWARPS = NT / 32;
    constexpr float INV_SQRT_D = D == 128 ? 0.08838834764831845f : 0.125f;
    VX_SHARED float xs[D];
    VX_SHARED float red[NWARPS];
    VX_SHARED unsigned int cs[D];
    const int tid = VX_THREAD_IDX, lane = tid % 32, warp = tid / 32;
    const int h = VX_BLOCK_IDX(y), n_kv = VX_GRID_DIM(y);
    const int b = VX_BLOCK_IDX(z) / 2;
    const size_t bh = (size_t)b * n_kv + h;
    const int pos = slot_shape[0] - 1;
    if (VX_BLOCK_IDX(z) % 2 == 0) VX_ENCODE(kx, k_mean, k_rot, D, 1, k_scale, k_levels, kw, kn, kn_shape[2], KB, KHAD, xs, cs, red, pos);
    else VX_ENCODE(vx, v_mean, v_rot, D, 1, v_scale, v_levels, vw, vn, vn_shape[2], VB, VHAD, xs, cs, red, pos);
    if (tid == 0 && h == 0 && VX_BLOCK_IDX(z) == 0) done[0] = 0.f;
"""

INPUTS = ["q", "q_mean", "rot", "k_scale", "k_mean", "softmax_scale", "kw", "kn", "vw", "vn",
          "k_levels", "v_levels", "count", "sinks", "v_scale", "v_mean", "rot_t", "kx", "vx",
          "counter", "scratch", "chain"]
OUTPUTS = ["out", "ml_out"]
APPEND_INPUTS = ["kx", "vx", "k_mean", "k_rot", "k_scale", "k_levels", "v_mean", "v_rot", "v_scale", "v_levels",
                 "kw", "kn", "vw", "vn", "slot", "chain"]

# name -> (input names, output names, body)
KERNELS = {"decode": (INPUTS, OUTPUTS, DECODE), "append": (APPEND_INPUTS, ["done"], APPEND)}


TYPES = {"cuda": {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"},
         "metal": {"float32": "float", "float16": "half", "bfloat16": "bfloat16_t"}}


def constants(template, backend: str) -> str:
    """The kernel's specialisation, ``template`` ((name, value) pairs: bool, int or dtype), as
    constants for the start of the body: baked into the source instead of passed as MLX template
    arguments, which cost ~0.13 µs of CPU each per launch on the H200's host."""
    out = []
    for name, value in template:
        if isinstance(value, bool):
            out.append(f"constexpr bool {name} = {str(value).lower()};")
        elif isinstance(value, int):
            out.append(f"constexpr int {name} = {value};")
        else:  # a dtype (mx.float16 or "float16")
            out.append(f"using {name} = {TYPES[backend][str(value).split('.')[-1]]};")
    return "\n".join(out) + "\n"


def render(name: str, backend: str) -> tuple[str, str]:
    """(header, source) of kernel ``name`` for ``backend`` ('cuda' or 'metal'): the backend's
    prelude followed by the shared helpers and the shared body, verbatim."""
    prelude = PRELUDES[backend]
    return prelude.header + HELPERS, prelude.index + KERNELS[name][2]


def compact(src: str) -> str:
    """src without ``//`` comments, indentation, runs of spaces and blank lines: MLX's wrappers
    copy the whole source into a new string on every launch (on the H200's host, 25 KB of
    source cost ~4.5 µs per launch against a one-line kernel). The sources have no ``//`` and
    no double spaces inside string literals."""
    lines = (re.sub(r" {2,}", " ", re.sub(r"//.*", "", line)).strip() for line in src.splitlines())
    return "\n".join(line for line in lines if line) + "\n"
