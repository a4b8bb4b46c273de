/* Decode attention over ScalarCodec codes on the CPU: the coded tokens' partial (max, sum of
 * exp, value sum in the value codec's basis) for one query token, as
 * velox.kernels.reference.attend takes it from a kernel (``coded_partial``).
 *
 * MLX's CPU backend runs no custom kernels, and its gathers cost more per code than float32
 * SDPA spends per coordinate, so velox.kernels.cpu compiles this file with the system's C
 * compiler on first use and calls it through ctypes. Plain C99 (OpenMP optional).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define MAX_D 256

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);          /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign;                                      /* zero */
    } else {                                              /* subnormal: normalise */
        exp = 113u;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}

/* Tiles of TT tokens, the token index innermost so the compiler vectorises over tokens: for
 * each coordinate, TT codes (shift, mask), TT level lookups and one FMA per query row. */
#define TT 16

/* x[d][t] for the tile's tokens t < TT: levels[d][code d of token t], words [TT][W] (transposed
 * from the cache's [token][W] into wt first). Inlined with a constant `bits` at each call. */
static inline void tile_levels(const uint32_t* words, size_t stride, int tn, const float* levels, int D,
                               int bits, uint32_t* wt, float* x) {
    const int nl = 1 << bits, per_word = 32 / bits, W = D / per_word;
    const uint32_t mask = (uint32_t)nl - 1u;
#if defined(__AVX512F__)
    if (bits <= 4) {  /* 16 tokens' word w in one gather; 16 levels in one permute per coordinate */
        const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32((int)stride));
        const __mmask16 live = (__mmask16)((1u << tn) - 1u);
        const __m512i vmask = _mm512_set1_epi32((int)mask);
        for (int w = 0; w < W; w++) {
            const __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, index,
                                                             (const void*)(words + w), 4);
            for (int j = 0; j < per_word; j++) {
                const int d = w * per_word + j;
                const __m512 table = _mm512_maskz_loadu_ps((__mmask16)((1u << nl) - 1u), levels + (size_t)d * nl);
                const __m512i code = _mm512_and_si512(_mm512_srli_epi32(word, (unsigned)(j * bits)), vmask);
                _mm512_storeu_ps(x + d * TT, _mm512_permutexvar_ps(code, table));
            }
        }
        return;
    }
#elif defined(__AVX2__)
    if (bits <= 4) {  /* as above, 8 tokens at a time; 16 levels as two 8-entry permutes and a blend */
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i index = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)stride));
        const __m256i vmask = _mm256_set1_epi32((int)mask);
        const __m256i lo_live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nl), lane);
        const __m256i hi_live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nl - 8), lane);
        for (int half = 0; half < TT / 8; half++) {
            const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(tn - 8 * half), lane);
            const uint32_t* base = words + (size_t)8 * half * stride;
            for (int w = 0; w < W; w++) {
                const __m256i word = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)(base + w),
                                                                 index, live, 4);
                for (int j = 0; j < per_word; j++) {
                    const int d = w * per_word + j;
                    const float* lv = levels + (size_t)d * nl;
                    const __m256i code = _mm256_and_si256(_mm256_srl_epi32(word, _mm_cvtsi32_si128(j * bits)), vmask);
                    __m256 v = _mm256_permutevar8x32_ps(_mm256_maskload_ps(lv, lo_live), code);
                    if (nl > 8)  /* code bit 3 (moved to the sign bit) picks the upper eight */
                        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(_mm256_maskload_ps(lv + 8, hi_live), code),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
                    _mm256_storeu_ps(x + d * TT + 8 * half, v);
                }
            }
        }
        return;
    }
#endif
    for (int w = 0; w < W; w++)
        for (int t = 0; t < TT; t++) wt[w * TT + t] = t < tn ? words[t * stride + w] : 0u;
    for (int d = 0; d < D; d++) {
        const uint32_t* ww = wt + (d / per_word) * TT;
        const int shift = (d % per_word) * bits;
        const float* lv = levels + (size_t)d * nl;
#pragma omp simd
        for (int t = 0; t < TT; t++) x[d * TT + t] = lv[(ww[t] >> shift) & mask];
    }
}

static inline void tile_levels_any(const uint32_t* words, size_t stride, int tn, const float* levels, int D,
                                   int bits, uint32_t* wt, float* x) {
    switch (bits) {  /* one specialised copy per width */
        case 1: tile_levels(words, stride, tn, levels, D, 1, wt, x); break;
        case 2: tile_levels(words, stride, tn, levels, D, 2, wt, x); break;
        case 4: tile_levels(words, stride, tn, levels, D, 4, wt, x); break;
        default: tile_levels(words, stride, tn, levels, D, 8, wt, x); break;
    }
}

/* y[t] = Σ_d q[d] · x[d][t] over a tile. Written per t-vector: left to itself, the compiler
 * vectorises over d with 16-strided gathers. */
static inline void tile_dot(const float* q, const float* x, int D, float* y) {
#if defined(__AVX512F__)
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();  /* two chains: FMA latency */
    for (int d = 0; d + 1 < D; d += 2) {
        a = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(x + d * TT), a);
        b = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), _mm512_loadu_ps(x + (d + 1) * TT), b);
    }
    _mm512_storeu_ps(y, _mm512_add_ps(a, b));
#else
    for (int t = 0; t < TT; t++) y[t] = 0.f;
    for (int d = 0; d < D; d++) {
#pragma omp simd
        for (int t = 0; t < TT; t++) y[t] += q[d] * x[d * TT + t];
    }
#endif
}

/* acc[d][t] += y[t] · x[d][t] over a tile. */
static inline void tile_axpy(const float* y, const float* x, int D, float* acc) {
#if defined(__AVX512F__)
    const __m512 yv = _mm512_loadu_ps(y);
    for (int d = 0; d < D; d++)
        _mm512_storeu_ps(acc + d * TT, _mm512_fmadd_ps(yv, _mm512_loadu_ps(x + d * TT), _mm512_loadu_ps(acc + d * TT)));
#else
    for (int d = 0; d < D; d++) {
#pragma omp simd
        for (int t = 0; t < TT; t++) acc[d * TT + t] += y[t] * x[d * TT + t];
    }
#endif
}

/* Cephes' expf polynomial: exp(r) ≈ 1 + r + r²·p(r) for |r| ≤ ln 2 / 2, p's coefficients from the highest */
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* s[t] = exp(s[t] − m) for t < n; returns their sum. */
static inline float exp_shift_sum(float* s, int n, float m) {
    float l = 0.f;
    int t = 0;
#if defined(__AVX512F__)
    /* Cephes' expf: 2^k · p(r), r = x − k·ln 2 (ln 2 in two parts), ~1 ulp; 16 lanes at a time */
    const __m512 mv = _mm512_set1_ps(m), one = _mm512_set1_ps(1.f);
    __m512 acc = _mm512_setzero_ps();
    for (; t < n; t += 16) {
        const __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), mv), _mm512_set1_ps(-87.33654f));
        const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
        r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
        __m512 p = _mm512_set1_ps(EXP_POLY[0]);
        for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
        p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));
        const __m512 e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k));
        _mm512_mask_storeu_ps(s + t, live, e);
        acc = _mm512_add_ps(acc, e);
    }
    l = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    /* the same, 8 lanes at a time; 2^k built in the exponent bits (k in [−126, 0]) */
    const __m256 mv = _mm256_set1_ps(m), one = _mm256_set1_ps(1.f);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc = _mm256_setzero_ps();
    for (; t < n; t += 8) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane);
        const __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_maskload_ps(s + t, live), mv), _mm256_set1_ps(-87.33654f));
        const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
        r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
        __m256 p = _mm256_set1_ps(EXP_POLY[0]);
        for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
        const __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k),
                                                                                      _mm256_set1_epi32(127)), 23));
        const __m256 e = _mm256_and_ps(_mm256_mul_ps(p, two_k), _mm256_castsi256_ps(live));
        _mm256_maskstore_ps(s + t, live, e);
        acc = _mm256_add_ps(acc, e);
    }
    float part[8];
    _mm256_storeu_ps(part, acc);
    for (int i = 0; i < 8; i++) l += part[i];
#endif
    for (; t < n; t++) { s[t] = expf(s[t] - m); l += s[t]; }
    return l;
}

/* The softmax statistics of one (batch, KV head) pair's scores s [R, n] (s becomes exp(s − m))
 * and its value sums: acc [R, D] = Σ_t exp(s_t − m) · norm_t · levels[code_t]; lanes: [R, D, TT] scratch. */
static void softmax_and_values(int R, int D, int N, int n, int vb, size_t bh, float* s, float* lanes,
                               const uint32_t* vw, const uint16_t* vn, const float* vl,
                               float* m_out, float* l_out, float* a) {
    const int wv = D * vb / 32;
    uint32_t wt[MAX_D * TT / 4];
    float x[MAX_D * TT], y[TT], norm[TT];
    for (int r = 0; r < R; r++) {
        float* sr = s + (size_t)r * n;
        float m = -INFINITY, l;
        for (int t = 0; t < n; t++) m = sr[t] > m ? sr[t] : m;
        l = exp_shift_sum(sr, n, m);
        m_out[bh * R + r] = m;
        l_out[bh * R + r] = l;
    }
    for (int i = 0; i < R * D * TT; i++) lanes[i] = 0.f;
    for (int t0 = 0; t0 < n; t0 += TT) {  /* per-lane sums, reduced once at the end */
        const int tn = n - t0 < TT ? n - t0 : TT;
        tile_levels_any(vw + (bh * N + t0) * wv, wv, tn, vl, D, vb, wt, x);
        for (int t = 0; t < TT; t++) norm[t] = t < tn ? half_to_float(vn[bh * N + t0 + t]) : 0.f;
        for (int r = 0; r < R; r++) {
            for (int t = 0; t < TT; t++) y[t] = t < tn ? s[(size_t)r * n + t0 + t] * norm[t] : 0.f;
            tile_axpy(y, x, D, lanes + (size_t)r * D * TT);
        }
    }
    for (int i = 0; i < R * D; i++) {
        float sum = 0.f;
        for (int t = 0; t < TT; t++) sum += lanes[(size_t)i * TT + t];
        a[i] = sum;
    }
}

/* One (batch, KV head) pair per iteration of the outer loop.
 *   q      [B, H, R, D]  queries in the key basis ((q @ R_k) · s_k, softmax scale included)
 *   qm     [B, H, R]     q · mean_k, or NULL
 *   kw, vw [B, H, N, D·bits/32] codes (N allocated tokens, the first n coded)
 *   kn, vn [B, H, N]     fp16 norms (bits)
 *   klev   [H, D, 2^kb], vlev [H, D, 2^vb] levels
 *   work   [B, H, R·n + R·D·TT] scratch (scores, then per-lane value sums)
 * out: m, l [B, H, R]; acc [B, H, R, D] = Σ_t exp(s_t − m) · norm_t · levels[code_t].
 */
void velox_cpu_partial(int B, int H, int R, int D, int N, int n, int kb, int vb,
                       const float* q, const float* qm, const uint32_t* kw, const uint16_t* kn,
                       const uint32_t* vw, const uint16_t* vn, const float* klev, const float* vlev,
                       float* work, float* m_out, float* l_out, float* acc) {
    const int wk = D * kb / 32;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* kl = klev + (size_t)h * D * (1 << kb);
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        uint32_t wt[MAX_D * TT / 4];
        float x[MAX_D * TT], y[TT], norm[TT];
        for (int t0 = 0; t0 < n; t0 += TT) {  /* scores */
            const int tn = n - t0 < TT ? n - t0 : TT;
            tile_levels_any(kw + ((size_t)bh * N + t0) * wk, wk, tn, kl, D, kb, wt, x);
            for (int t = 0; t < TT; t++) norm[t] = t < tn ? half_to_float(kn[(size_t)bh * N + t0 + t]) : 0.f;
            for (int r = 0; r < R; r++) {
                tile_dot(qh + (size_t)r * D, x, D, y);
                const float mean = qm ? qm[(size_t)bh * R + r] : 0.f;
                for (int t = 0; t < tn; t++) s[(size_t)r * n + t0 + t] = y[t] * norm[t] + mean;
            }
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}

/* cst[d][t] = rope_cs[first + t][d] for the tile's tn tokens (row first + 0 repeated after them). */
static inline void tile_cos_sin(const float* rope_cs, int first, int tn, int D, float* cst) {
    for (int t = 0; t < TT; t++) {
        const float* cs = rope_cs + (size_t)(first + (t < tn ? t : 0)) * D;
        for (int d = 0; d < D; d++) cst[d * TT + t] = cs[d];
    }
}

/* Turn the tile's pre-RoPE keys x [D][TT] by RoPE (cst as tile_cos_sin gives it; pair (a, b):
 * x_a·c − x_b·s, x_a·s + x_b·c) and score them: s[r][t0 + t] = q_r · x_t for t < tn. */
static inline void rope_tile_scores(float* x, const float* cst, const int32_t* pairs, int D, int R,
                                    const float* qh, float* s, int n, int t0, int tn) {
    float y[TT];
    for (int j = 0; j < D / 2; j++) {
        float* xa = x + pairs[2 * j] * TT;
        float* xb = x + pairs[2 * j + 1] * TT;
        const float* c = cst + pairs[2 * j] * TT;
        const float* sn = cst + pairs[2 * j + 1] * TT;
#pragma omp simd
        for (int t = 0; t < TT; t++) {
            const float a = xa[t], b = xb[t];
            xa[t] = a * c[t] - b * sn[t];
            xb[t] = a * sn[t] + b * c[t];
        }
    }
    for (int r = 0; r < R; r++) {
        tile_dot(qh + (size_t)r * D, x, D, y);
        for (int t = 0; t < tn; t++) s[(size_t)r * n + t0 + t] = y[t];
    }
}

/* Pre-RoPE keys coded in a basis that turns only within RoPE's pairs (velox.methods.rope), so
 * the query is rotated into it once: per tile, x[d][t] = levels[d][code] · norm_t + mean[d]
 * (levels times the codec's scale, mean in its basis; codes of any widths ≤ 8 at the layout's
 * word and shift, possibly straddling two words), then each pair (a, b) is turned by RoPE at the
 * token's position: rope_cs[p][a] = m·cos, rope_cs[p][b] = m·sin, read off the rope module.
 *   klev [H, D, K]; klayout [H, D, 3] (word, shift, bits); kmean [H, D]; pairs [D/2, 2];
 *   rope_cs [≥ offset + n, D]; offset: position of coded token 0; wk: words per key.
 * Other arguments and the outputs as velox_cpu_partial's. */
void velox_cpu_partial_rope(int B, int H, int R, int D, int N, int n, int K, int wk, int vb, int offset,
                            const float* q, const uint32_t* kw, const uint16_t* kn, const uint32_t* vw,
                            const uint16_t* vn, const float* klev, const int32_t* klayout, const float* kmean,
                            const float* rope_cs, const int32_t* pairs, const float* vlev,
                            float* work, float* m_out, float* l_out, float* acc) {
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* kl = klev + (size_t)h * D * K;
        const int32_t* lay = klayout + (size_t)h * D * 3;
        const float* mean = kmean + (size_t)h * D;
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        uint32_t wt[MAX_D * 8 / 32 * TT];
        float x[MAX_D * TT], cst[MAX_D * TT], norm[TT];
        for (int t0 = 0; t0 < n; t0 += TT) {
            const int tn = n - t0 < TT ? n - t0 : TT;
            const uint32_t* words = kw + ((size_t)bh * N + t0) * wk;
            /* the tile's words and RoPE factors transposed ([w][t], [d][t]): the loops below run
             * over the tile's tokens, which the compiler vectorises */
            for (int w = 0; w < wk; w++)
                for (int t = 0; t < TT; t++) wt[w * TT + t] = t < tn ? words[(size_t)t * wk + w] : 0u;
            for (int t = 0; t < TT; t++) norm[t] = t < tn ? half_to_float(kn[(size_t)bh * N + t0 + t]) : 0.f;
            tile_cos_sin(rope_cs, offset + t0, tn, D, cst);
            for (int d = 0; d < D; d++) {
                const int w = lay[3 * d], shift = lay[3 * d + 1], bits = lay[3 * d + 2];
                const uint32_t mask = (1u << bits) - 1u;
                const uint32_t* lo = wt + w * TT;
                const float* lv = kl + (size_t)d * K;
                const float md = mean[d];
                float* xd = x + d * TT;
                if (shift + bits > 32) {  /* the code continues into the next word */
                    const uint32_t* hi = lo + TT;
#pragma omp simd
                    for (int t = 0; t < TT; t++) xd[t] = lv[((lo[t] >> shift) | (hi[t] << (32 - shift))) & mask] * norm[t] + md;
                } else {
#pragma omp simd
                    for (int t = 0; t < TT; t++) xd[t] = lv[(lo[t] >> shift) & mask] * norm[t] + md;
                }
            }
            rope_tile_scores(x, cst, pairs, D, R, qh, s, n, t0, tn);
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}

/* commvq's keys (velox.methods.commvq): per token, head and group g, S one-byte codes (A, B) =
 * (code >> 4, code & 15) add up U[g][s][A] + V[g][s][B] over the group's Dg dims in its
 * [re | im] layout; model dim d reads y[inv_perm[d]] · norm / scale[d] (pre-RoPE), then RoPE
 * and the scores as velox_cpu_partial_rope.
 *   kc [B, H, N, G·S] uint8; book_u, book_v [H·G, S, 16, Dg]; inv_perm [D]; inv_scale [H, D]. */
void velox_cpu_partial_commvq(int B, int H, int R, int D, int N, int n, int G, int S, int vb, int offset,
                              const float* q, const uint8_t* kc, const uint16_t* kn, const uint32_t* vw,
                              const uint16_t* vn, const float* book_u, const float* book_v, const int32_t* inv_perm,
                              const float* inv_scale, const float* rope_cs, const int32_t* pairs, const float* vlev,
                              float* work, float* m_out, float* l_out, float* acc) {
    const int Dg = D / G, GS = G * S;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* isc = inv_scale + (size_t)h * D;
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        float x[MAX_D * TT], cst[MAX_D * TT], yv[MAX_D];
        for (int t0 = 0; t0 < n; t0 += TT) {
            const int tn = n - t0 < TT ? n - t0 : TT;
            for (int t = 0; t < TT; t++) {
                if (t >= tn) {
                    for (int d = 0; d < D; d++) x[d * TT + t] = 0.f;
                    continue;
                }
                const uint8_t* code = kc + ((size_t)bh * N + t0 + t) * GS;
                const float norm = half_to_float(kn[(size_t)bh * N + t0 + t]);
                for (int g = 0; g < G; g++) {
                    float* yg = yv + g * Dg;
                    for (int e = 0; e < Dg; e++) yg[e] = 0.f;
                    for (int st = 0; st < S; st++) {
                        const uint8_t c = code[g * S + st];
                        const size_t base = (((size_t)(h * G + g) * S + st) * 16) * Dg;
                        const float* u = book_u + base + (size_t)(c >> 4) * Dg;
                        const float* v = book_v + base + (size_t)(c & 15) * Dg;
#pragma omp simd
                        for (int e = 0; e < Dg; e++) yg[e] += u[e] + v[e];
                    }
                }
                for (int d = 0; d < D; d++) x[d * TT + t] = yv[inv_perm[d]] * norm * isc[d];
            }
            tile_cos_sin(rope_cs, offset + t0, tn, D, cst);
            rope_tile_scores(x, cst, pairs, D, R, qh, s, n, t0, tn);
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}
