/* The FP4 x int8 dot (fp4_dot_q8) in 256-bit integer SIMD, included by the two files that build
 * it: quant_avx2.c (vpmaddubsw + vpmaddwd) and quant_avxvnni.c (FD_Q8_VNNI: vpdpbusd).
 *
 * One 32-byte load holds two blocks' weights; its low and high nibbles, looked up with vpshufb,
 * become 2 x E2M1 + 12, unsigned in [0, 24] (FD_FP4_PAIRS order, which the activations are
 * quantized into), the operand the unsigned-times-signed dot wants. The + 12 adds 12 x the sum of
 * the block's int8 activations, which the quantizer counted: one multiply-add per eight blocks
 * takes it off again. Dword lane l sums bytes 4l..4l+3 of both nibble registers: lanes 0-3
 * belong to the first block, 4-7 to the second. The block sums are exact integers (at most
 * 32 * 24 * 127), converted once and multiplied by the block's scale (weight E8M0 times the
 * activation step) into fp32 accumulators. Eight blocks' weight scales are widened at once from
 * their E8M0 bytes; each pair's lanes are picked with one vpermps.
 */
#ifndef FD_QUANT_Q8_AVX2_H
#define FD_QUANT_Q8_AVX2_H

#include <immintrin.h>

#include "fd_platform.h"
#include "quant_kernels.h"

/* Sum over byte groups: lane l += Σ a[4l..4l+3] * b[4l..4l+3] for two register pairs. */
#if defined(FD_Q8_VNNI)
#define FD_Q8_DOT2(a0, b0, a1, b1)                                                                 \
    _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a0, b0), a1, b1)
#define FD_Q8_DOT1(a0, b0) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a0, b0)
#else
/* vpmaddubsw's 16-bit pair sums are at most 2 * 24 * 127, so two of them add without saturating */
#define FD_Q8_DOT2(a0, b0, a1, b1)                                                                 \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a0, b0), _mm256_maddubs_epi16(a1, b1)), \
                      _mm256_set1_epi16(1))
#define FD_Q8_DOT1(a0, b0) _mm256_madd_epi16(_mm256_maddubs_epi16(a0, b0), _mm256_set1_epi16(1))
#endif

/* 2 x E2M1 + 12 of each code */
FD_INLINE __m256i q8_e2m1_lut(void) {
    return _mm256_broadcastsi128_si256(
        _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
}

/* Eight E8M0 bytes -> 2^(e-127) in lane j, as fd_e8m0_f32 (0: 2^-127, a subnormal; 255: NaN). */
FD_INLINE __m256 q8_e8m0x8(const uint8_t *s) {
    const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s));
    __m256i bits = _mm256_slli_epi32(e, 23);
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00400000),
                              _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000),
                              _mm256_cmpeq_epi32(e, _mm256_set1_epi32(255)));
    return _mm256_castsi256_ps(bits);
}

/* The sum of the eight lanes. */
FD_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R weight rows x M activation rows. */
FD_INLINE void fp4_q8_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                         const int8_t *const *xq, const float *const *xd, float *y, size_t ys,
                         const int R, const int M) {
    const __m256i lut = q8_e2m1_lut(), nib = _mm256_set1_epi8(0x0F);
    const __m256 twelve = _mm256_set1_ps(12.0f);
    __m256 acc[2][FD_DOT_MAX_M];
    float offset[2][FD_DOT_MAX_M]; /* the tail blocks' share of the + 12 */
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm256_setzero_ps(), offset[i][t] = 0.0f;
    const int nb = K / 32;
    int b = 0;
    /* One pair of blocks: weights at wp (32 bytes), activations of blocks b_ and b_ + 1 */
#define FD_Q8_PAIR(i, wp, b_)                                                                      \
    do {                                                                                           \
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)(wp));                           \
        const __m256i wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, nib));                 \
        const __m256i wh =                                                                         \
            _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib));          \
        for (int t = 0; t < M; t++) {                                                              \
            const int8_t *qp = xq[t] + (size_t)(b_) * 32;                                          \
            const __m256i sum = FD_Q8_DOT2(wl, _mm256_loadu_si256((const __m256i *)qp), wh,        \
                                           _mm256_loadu_si256((const __m256i *)(qp + 32)));        \
            acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), pair_scale[t], acc[i][t]);        \
        }                                                                                          \
    } while (0)
    for (; b + 8 <= nb; b += 8) {
        for (int i = 0; i < R; i++) {
            const uint8_t *wr = w + (size_t)i * ws + (size_t)b * 16;
            _mm_prefetch((const char *)(wr + 1024), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + 1088), _MM_HINT_T0);
            const __m256 sw = q8_e8m0x8(s + (size_t)i * ss + b);
            __m256 scale8[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) {
                scale8[t] = _mm256_mul_ps(sw, _mm256_loadu_ps(xd[t] + b));
                const __m256 sums = _mm256_loadu_ps(xd[t] + nb + b);
                acc[i][t] = _mm256_fnmadd_ps(_mm256_mul_ps(sums, twelve), scale8[t], acc[i][t]);
            }
            for (int p = 0; p < 4; p++) {
                const __m256i pick = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1,
                                                       2 * p + 1, 2 * p + 1, 2 * p + 1);
                __m256 pair_scale[FD_DOT_MAX_M];
                for (int t = 0; t < M; t++)
                    pair_scale[t] = _mm256_permutevar8x32_ps(scale8[t], pick);
                FD_Q8_PAIR(i, wr + 32 * p, b + 2 * p);
            }
        }
    }
    for (; b + 2 <= nb; b += 2) /* the pairs after the last eight blocks */
        for (int i = 0; i < R; i++) {
            const float s0 = fd_e8m0_f32[s[(size_t)i * ss + b]];
            const float s1 = fd_e8m0_f32[s[(size_t)i * ss + b + 1]];
            __m256 pair_scale[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) {
                const float c0 = s0 * xd[t][b], c1 = s1 * xd[t][b + 1];
                pair_scale[t] = _mm256_set_m128(_mm_set1_ps(c1), _mm_set1_ps(c0));
                offset[i][t] += c0 * xd[t][nb + b] + c1 * xd[t][nb + b + 1];
            }
            FD_Q8_PAIR(i, w + (size_t)i * ws + (size_t)b * 16, b);
        }
#undef FD_Q8_PAIR
    if (b < nb) /* a last, odd block in FD_FP4_EVEN_ODD order: even codes, then odd */
        for (int i = 0; i < R; i++) {
            const __m128i bytes =
                _mm_loadu_si128((const __m128i *)(w + (size_t)i * ws + (size_t)b * 16));
            const __m128i n4 = _mm_set1_epi8(0x0F);
            const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), n4),
                                                   _mm_and_si128(bytes, n4));
            const __m256i wv = _mm256_shuffle_epi8(lut, codes);
            const float sw = fd_e8m0_f32[s[(size_t)i * ss + b]];
            for (int t = 0; t < M; t++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t] + (size_t)b * 32));
                const float c = sw * xd[t][b];
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FD_Q8_DOT1(wv, xv)),
                                            _mm256_set1_ps(c), acc[i][t]);
                offset[i][t] += c * xd[t][nb + b];
            }
        }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++)
            y[(size_t)t * ys + i] = 0.5f * (hsum256(acc[i][t]) - 12.0f * offset[i][t]);
}

/* Two weight rows at a time while the registers allow it (up to two activation rows). */
FD_INLINE void fp4_dot_q8_rows(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                               int K, const int8_t *const *xq, const float *const *xd, int m,
                               float *y, size_t ys) {
    int r = 0;
    if (m <= 2)
        for (; r + 2 <= rows; r += 2) {
            const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;
            if (m == 1)
                fp4_q8_rm(wr, ws, sr, ss, K, xq, xd, y + r, ys, 2, 1);
            else
                fp4_q8_rm(wr, ws, sr, ss, K, xq, xd, y + r, ys, 2, 2);
        }
    for (; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;
        FD_SWITCH_M4(m, fp4_q8_rm(wr, ws, sr, ss, K, xq, xd, y + r, ys, 1, FD_M))
    }
}

#endif
