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

/* Turn the tile's pre-RoPE keys x [D][TT] by RoPE and score them: rope_cs_t [D, rows] holds, per
 * dim, m·cos (a pair's first) or m·sin (its second) at every position, so the tile's factors are
 * TT consecutive floats at column first = offset + t0 (rows ≥ first + TT). Pair (a, b):
 * x_a·c − x_b·s, x_a·s + x_b·c; then s[r][t0 + t] = q_r · x_t for t < tn. */
static inline void rope_tile_scores(float* x, const float* rope_cs_t, size_t rows, int first,
                                    const int32_t* pairs, int D, int R, const float* qh, float* s, int n, int t0,
                                    int tn) {
    float y[TT];
    for (int j = 0; j < D / 2; j++) {
        float* xa = x + pairs[2 * j] * TT;
        float* xb = x + pairs[2 * j + 1] * TT;
        const float* c = rope_cs_t + pairs[2 * j] * rows + first;
        const float* sn = rope_cs_t + pairs[2 * j + 1] * rows + first;
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

/* A tile's codes of per-dim widths (≤ 8 bits, at klayout's word and shift, possibly straddling two
 * words) looked up: x[d][t] = lv[d][code] · norm[t] (+ mean[d] unless mean is NULL), for the tn
 * keys of words [tn, wk]. The words are transposed first ([w][t]) so the loops run over the
 * tile's tokens, which the compiler vectorises (gathers from lv). */
static inline void tile_layout_levels(const uint32_t* words, int wk, int tn, const int32_t* lay, const float* kl,
                                      int K, int D, const float* norm, const float* mean, float* x) {
    uint32_t wt[MAX_D * 8 / 32 * TT];
    for (int w = 0; w < wk; w++)
        for (int t = 0; t < TT; t++) wt[w * TT + t] = t < tn ? words[(size_t)t * wk + w] : 0u;
    for (int d = 0; d < D; d++) {
        const int w = lay[3 * d], shift = lay[3 * d + 1], bits = lay[3 * d + 2];
        const uint32_t mask = (1u << bits) - 1u;
        const uint32_t* lo = wt + w * TT;
        const float* lv = kl + (size_t)d * K;
        const float md = mean ? mean[d] : 0.f;
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
}

/* Pre-RoPE keys coded in a basis that turns only within RoPE's pairs (velox.methods.rope), so
 * the query is rotated into it once: per tile, x[d][t] = levels[d][code] · norm_t + mean[d]
 * (levels times the codec's scale, mean in its basis; codes of any widths ≤ 8 at the layout's
 * word and shift, possibly straddling two words), then each pair (a, b) is turned by RoPE at the
 * token's position: rope_cs_t[a][p] = m·cos, rope_cs_t[b][p] = m·sin, read off the rope module.
 *   klev [H, D, K]; klayout [H, D, 3] (word, shift, bits); kmean [H, D]; pairs [D/2, 2];
 *   rope_cs_t [D, rows], rows ≥ offset + n + TT; offset: position of coded token 0; wk: words per key.
 * Other arguments and the outputs as velox_cpu_partial's. */
void velox_cpu_partial_rope(int B, int H, int R, int D, int N, int n, int K, int wk, int vb, int offset,
                            const float* q, const uint32_t* kw, const uint16_t* kn, const uint32_t* vw,
                            const uint16_t* vn, const float* klev, const int32_t* klayout, const float* kmean,
                            const float* rope_cs_t, int rows, const int32_t* pairs, const float* vlev,
                            float* work, float* m_out, float* l_out, float* acc) {
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* kl = klev + (size_t)h * D * K;
        const int32_t* lay = klayout + (size_t)h * D * 3;
        const float* mean = kmean + (size_t)h * D;
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        float x[MAX_D * TT], norm[TT];
        for (int t0 = 0; t0 < n; t0 += TT) {
            const int tn = n - t0 < TT ? n - t0 : TT;
            for (int t = 0; t < TT; t++) norm[t] = t < tn ? half_to_float(kn[(size_t)bh * N + t0 + t]) : 0.f;
            tile_layout_levels(kw + ((size_t)bh * N + t0) * wk, wk, tn, lay, kl, K, D, norm, mean, x);
            rope_tile_scores(x, rope_cs_t, (size_t)rows, offset + t0, pairs, D, R, qh, s, n, t0, tn);
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}

/* commvq's keys (velox.methods.commvq), scored in the groups' layout, where each group of Dg dims
 * is [firsts | seconds] of its P = Dg/2 RoPE pairs: per token, head and group g, S one-byte codes
 * (A, B) = (code >> 4, code & 15) add up U[g][s][A] + V[g][s][B]; times 1/scale (laid out), turned
 * by RoPE at the token's position (cs_l: the cos/sin table laid out, so a pair's cos and sin sit
 * P apart), scored against the query laid out, times the norm. Layout order keeps every inner loop
 * contiguous: no per-key gather back to the model's dims.
 *   kc [B, H, N, G·S] uint8; book_u, book_v [H·G, S, 16, Dg]; perm [D]: layout -> model dim;
 *   inv_scale_l [H, D] (layout order); cs_l [≥ offset + n, D] (layout order). */
void velox_cpu_partial_commvq(int B, int H, int R, int D, int N, int n, int G, int S, int vb, int offset,
                              const float* q, const uint8_t* kc, const uint16_t* kn, const uint32_t* vw,
                              const uint16_t* vn, const float* book_u, const float* book_v, const int32_t* perm,
                              const float* inv_scale_l, const float* cs_l, const float* vlev,
                              float* work, float* m_out, float* l_out, float* acc) {
    const int Dg = D / G, P = Dg / 2, GS = G * S;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* isc = inv_scale_l + (size_t)h * D;
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        float* ql = s + (size_t)R * n;  /* the query laid out, in the value lanes' scratch (free until then) */
        float y[MAX_D], x[MAX_D];
        for (int r = 0; r < R; r++)
            for (int k = 0; k < D; k++) ql[(size_t)r * D + k] = qh[(size_t)r * D + perm[k]];
        for (int t = 0; t < n; t++) {
            const uint8_t* code = kc + ((size_t)bh * N + t) * GS;
            const float norm = half_to_float(kn[(size_t)bh * N + t]);
            const float* cs = cs_l + (size_t)(offset + t) * D;
            for (int g = 0; g < G; g++) {
                float* yg = y + g * Dg;
                for (int st = 0; st < S; st++) {
                    const uint8_t c = code[g * S + st];
                    const size_t base = (((size_t)(h * G + g) * S + st) * 16) * Dg;
                    const float* u = book_u + base + (size_t)(c >> 4) * Dg;
                    const float* v = book_v + base + (size_t)(c & 15) * Dg;
                    if (st == 0) {
#pragma omp simd
                        for (int e = 0; e < Dg; e++) yg[e] = u[e] + v[e];
                    } else {
#pragma omp simd
                        for (int e = 0; e < Dg; e++) yg[e] += u[e] + v[e];
                    }
                }
                const float* ig = isc + g * Dg;
                const float* cg = cs + g * Dg;
                float* xg = x + g * Dg;
#pragma omp simd
                for (int i = 0; i < P; i++) {
                    const float a = yg[i] * ig[i], b = yg[P + i] * ig[P + i];
                    xg[i] = a * cg[i] - b * cg[P + i];
                    xg[P + i] = a * cg[P + i] + b * cg[i];
                }
            }
            for (int r = 0; r < R; r++) {
                const float* qr = ql + (size_t)r * D;
                float dot = 0.f;
#pragma omp simd reduction(+:dot)
                for (int k = 0; k < D; k++) dot += qr[k] * x[k];
                s[(size_t)r * n + t] = dot * norm;
            }
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}

/* x [D][TT] = M · y [D][TT] (M [D, D] row-major: x_j = Σ_i M[j][i]·y_i), eight rows of M at a
 * time so each y row loaded feeds eight FMAs (with AVX-512 a tile row is one register). */
static inline void tile_transform(const float* M, const float* y, int D, float* x) {
    int j = 0;
#if defined(__AVX512F__)
    for (; j + 8 <= D; j += 8) {
        __m512 a[8];
        for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
        const float* m = M + (size_t)j * D;
        for (int i = 0; i < D; i++) {
            const __m512 yi = _mm512_loadu_ps(y + i * TT);
            for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(_mm512_set1_ps(m[(size_t)k * D + i]), yi, a[k]);
        }
        for (int k = 0; k < 8; k++) _mm512_storeu_ps(x + (j + k) * TT, a[k]);
    }
#endif
    for (; j < D; j++) {
        float acc[TT] = {0};
        for (int i = 0; i < D; i++)
#pragma omp simd
            for (int t = 0; t < TT; t++) acc[t] += M[(size_t)j * D + i] * y[i * TT + t];
        for (int t = 0; t < TT; t++) x[j * TT + t] = acc[t];
    }
}

/* x [D][TT] = H · y (H: the Sylvester Hadamard matrix, unnormalised; D a power of two): D·log D
 * additions per key instead of D² multiply-adds. */
static inline void tile_hadamard(const float* y, int D, float* x) {
    for (int i = 0; i < D * TT; i++) x[i] = y[i];
    for (int len = 1; len < D; len <<= 1)
        for (int i = 0; i < D; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                float* a = x + j * TT;
                float* b = x + (j + len) * TT;
#pragma omp simd
                for (int t = 0; t < TT; t++) {
                    const float u = a[t], v = b[t];
                    a[t] = u + v;
                    b[t] = u - v;
                }
            }
}

/* Pre-RoPE keys in a basis that mixes RoPE pairs (spectral's full eigenbasis, vecinfer's and
 * rabitq's rotations): a tile's coordinates y [D][TT] are looked up from the codes, turned back to
 * the model's pre-RoPE dims (the basis does not commute with RoPE, so the query cannot be moved
 * into it once): x = M·y (dense, D² per key) or, for a randomized Hadamard rotation, x = H·y
 * (D·log D) with its signs and 1/√D in rowscale; then per token and dim
 *   x[d][t] = (x[d][t] · rowscale[d] · norm_t + cent[id_t][d]) · colscale[d] + offset[d],
 * turned by RoPE and scored as in velox_cpu_partial_rope. Lookups (tables transposed so the loops
 * over a tile's tokens vectorise as gathers):
 *   kind 0: codes of per-dim widths at klayout's (word, shift, bits) into klev [H, D, K]
 *           (spectral: levels × scale; rabitq: ±1/√D signs, K = 2); kw uint32 [B, H, N, wk];
 *   kind 1: product VQ, wk one-byte codes per key over sub-vectors of dsub dims into
 *           klev [H, wk, dsub, K] (vecinfer's codebooks, transposed); kw uint8 [B, H, N, wk].
 *   kn [B, H, N] fp16 per-token factor or NULL (1); kid [B, H, N] uint8 centroid ids into
 *   cent_t [H, D, C] (transposed), or NULL; rot [H or 1, D, D] (rot_per_head 0: shared), or NULL
 *   for the Hadamard; rowscale [D] or NULL; colscale, offset [H, D] or NULL. Other arguments and
 *   the outputs as velox_cpu_partial_rope's. */
void velox_cpu_partial_dense(int B, int H, int R, int D, int N, int n, int kind, int K, int wk, int dsub, int C,
                             int rot_per_head, int vb, int offset, const float* q, const void* kw,
                             const uint16_t* kn, const uint8_t* kid, const uint32_t* vw, const uint16_t* vn,
                             const float* klev, const int32_t* klayout, const float* rot, const float* rowscale,
                             const float* cent_t, const float* colscale, const float* koffset,
                             const float* rope_cs_t, int rows, const int32_t* pairs, const float* vlev,
                             float* work, float* m_out, float* l_out, float* acc) {
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int h = bh % H;
        const float* qh = q + (size_t)bh * R * D;
        const float* M = rot ? rot + (rot_per_head ? (size_t)h * D * D : 0) : NULL;
        const float* sc_h = colscale ? colscale + (size_t)h * D : NULL;
        const float* off_h = koffset ? koffset + (size_t)h * D : NULL;
        float* s = work + (size_t)bh * ((size_t)R * n + (size_t)R * D * TT);
        float y[MAX_D * TT], x[MAX_D * TT], norm[TT];
        int ids[TT], ct[MAX_D * TT];
        for (int t0 = 0; t0 < n; t0 += TT) {
            const int tn = n - t0 < TT ? n - t0 : TT;
            const size_t row = (size_t)bh * N + t0;
            for (int t = 0; t < TT; t++) {
                norm[t] = t >= tn ? 0.f : kn ? half_to_float(kn[row + t]) : 1.f;
                ids[t] = t < tn && kid ? kid[row + t] : 0;
            }
            if (kind == 0) {  /* the per-token factor now: the transform below is linear */
                tile_layout_levels((const uint32_t*)kw + row * wk, wk, tn, klayout + (size_t)h * D * 3,
                                   klev + (size_t)h * D * K, K, D, norm, NULL, y);
            } else {
                const uint8_t* codes = (const uint8_t*)kw + row * wk;
                for (int m = 0; m < wk; m++)
                    for (int t = 0; t < TT; t++) ct[m * TT + t] = t < tn ? codes[(size_t)t * wk + m] : 0;
                for (int m = 0; m < wk; m++)
                    for (int e = 0; e < dsub; e++) {
                        const float* lv = klev + (((size_t)h * wk + m) * dsub + e) * K;
                        const int* cm = ct + m * TT;
                        float* yd = y + (m * dsub + e) * TT;
#pragma omp simd
                        for (int t = 0; t < TT; t++) yd[t] = lv[cm[t]] * norm[t];
                    }
            }
            if (M) tile_transform(M, y, D, x);
            else tile_hadamard(y, D, x);
            for (int d = 0; d < D; d++) {
                const float sc = sc_h ? sc_h[d] : 1.f, of = off_h ? off_h[d] : 0.f, rs = rowscale ? rowscale[d] : 1.f;
                float* xd = x + d * TT;
                if (kid) {
                    const float* cd = cent_t + ((size_t)h * D + d) * C;
#pragma omp simd
                    for (int t = 0; t < TT; t++) xd[t] = (xd[t] * rs + cd[ids[t]]) * sc + of;
                } else {
#pragma omp simd
                    for (int t = 0; t < TT; t++) xd[t] = xd[t] * rs * sc + of;
                }
            }
            rope_tile_scores(x, rope_cs_t, (size_t)rows, offset + t0, pairs, D, R, qh, s, n, t0, tn);
        }
        softmax_and_values(R, D, N, n, vb, (size_t)bh, s, s + (size_t)R * n, vw, vn,
                           vlev + (size_t)h * D * (1 << vb), m_out, l_out, acc + (size_t)bh * R * D);
    }
}
