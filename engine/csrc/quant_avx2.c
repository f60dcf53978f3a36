/* AVX2 + FMA + F16C variant of the quant primitives; compiled with those flags only here.
 *
 * FP4: every E2M1 value (times any power of two) is exact in bf16, so two vpshufb lookups give
 * the high and low byte of each value's bf16 pattern; byte and word unpacks place them in the top
 * half of fp32 lanes. In-lane unpacks leave a block's 32 values in "quads" order
 * (FD_FP4_QUADS: 4 even elements, then the 4 odd ones of the same pairs), which the activations
 * are permuted to once per call. The block's partial dot is scaled once, as in the reference.
 * FP8: E4M3 bits are moved into an fp16 (bias 15 for 7) and converted with F16C, times 2^8.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "fd_platform.h"
#include "quant_kernels.h"
#include "quant_q8_avx2.h" /* fp4_dot_q8 with vpmaddubsw; hsum256 */

/* bf16 bit patterns of the 16 E2M1 codes, split into high and low bytes (vpshufb tables). */
FD_INLINE __m256i bf16_hi_lut(void) {
    return _mm256_broadcastsi128_si256(_mm_setr_epi8(0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40,
                                                     0x40, (char)0x80, (char)0xBF, (char)0xBF,
                                                     (char)0xBF, (char)0xC0, (char)0xC0,
                                                     (char)0xC0, (char)0xC0));
}
FD_INLINE __m256i bf16_lo_lut(void) {
    return _mm256_broadcastsi128_si256(_mm_setr_epi8(0x00, 0x00, (char)0x80, (char)0xC0, 0x00,
                                                     0x40, (char)0x80, (char)0xC0, 0x00, 0x00,
                                                     (char)0x80, (char)0xC0, 0x00, 0x40,
                                                     (char)0x80, (char)0xC0));
}

/* One 16-byte FP4 block -> 32 unscaled floats in quads order (v[0..3], 8 each). */
FD_INLINE void fp4_block_decode(const uint8_t *wb, __m256i hi_lut, __m256i lo_lut, __m256 v[4]) {
    const __m128i nib = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)wb);
    __m128i lo = _mm_and_si128(bytes, nib);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    __m256i hb = _mm256_shuffle_epi8(hi_lut, idx);
    __m256i lb = _mm256_shuffle_epi8(lo_lut, idx);
    __m256i wa = _mm256_unpacklo_epi8(lb, hb);
    __m256i wb2 = _mm256_unpackhi_epi8(lb, hb);
    const __m256i z = _mm256_setzero_si256();
    v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, wa));
    v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, wa));
    v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, wb2));
    v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, wb2));
}

FD_INLINE void fp4_dot_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M) {
    const __m256i hi_lut = bf16_hi_lut(), lo_lut = bf16_lo_lut();
    __m256 acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm256_setzero_ps();
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < R; i++) {
            const uint8_t *wb = w + (size_t)i * ws + (size_t)b * 16;
            _mm_prefetch((const char *)(wb + 1024), _MM_HINT_T0);
            __m256 v[4];
            fp4_block_decode(wb, hi_lut, lo_lut, v);
            __m256 sc = _mm256_set1_ps(fd_e8m0_f32[s[(size_t)i * ss + b]]);
            for (int t = 0; t < M; t++) {
                const float *xb = x[t] + b * 32;
                __m256 p = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
                __m256 q = _mm256_mul_ps(v[1], _mm256_loadu_ps(xb + 8));
                p = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xb + 16), p);
                q = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xb + 24), q);
                acc[i][t] = _mm256_fmadd_ps(_mm256_add_ps(p, q), sc, acc[i][t]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = hsum256(acc[i][t]);
}

static void fp4_dot_avx2(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows, int K,
                         const float *const *x, int m, float *y, size_t ys) {
    int r = 0;
    for (; r + 2 <= rows; r += 2) {
        const uint8_t *wr = w + (size_t)r * ws;
        const uint8_t *sr = s + (size_t)r * ss;
        FD_SWITCH_M4(m, fp4_dot_rm(wr, ws, sr, ss, K, x, y + r, ys, 2, FD_M))
    }
    for (; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        const uint8_t *sr = s + (size_t)r * ss;
        FD_SWITCH_M4(m, fp4_dot_rm(wr, ws, sr, ss, K, x, y + r, ys, 1, FD_M))
    }
}

static void fp4_decode_avx2(const uint8_t *w, const uint8_t *s, int K, float *dst) {
    const __m256i hi_lut = bf16_hi_lut(), lo_lut = bf16_lo_lut();
    for (int b = 0; b < K / 32; b++) {
        __m256 v[4];
        fp4_block_decode(w + b * 16, hi_lut, lo_lut, v);
        __m256 sc = _mm256_set1_ps(fd_e8m0_f32[s[b]]);
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(dst + b * 32 + 8 * q, _mm256_mul_ps(v[q], sc));
    }
}

/* 16 E4M3 bytes -> 16 floats equal to the E4M3 values times 2^-8, exactly: the sign-extended
 * byte shifted left 7 is the fp16 with the same fields (bias 15 for 7; subnormals stay
 * subnormal), converted with F16C; NaN codes become fp16 0xFFFF. The 2^8 goes onto each tile's
 * partial sum (exact). */
FD_INLINE void e4m3_decode16(__m128i bytes, __m256 out[2]) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                 _mm256_set1_epi16((short)0xBF80));
    const __m256i all = _mm256_set1_epi16(0x3F80);
    h = _mm256_or_si256(h, _mm256_cmpeq_epi16(_mm256_and_si256(h, all), all));
    out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

/* Loads n < 16 trailing elements zero-padded (bytes and floats). */
FD_INLINE __m128i load_bytes_tail(const uint8_t *p, int n) {
    uint8_t buf[16] = {0};
    memcpy(buf, p, (size_t)n);
    return _mm_loadu_si128((const __m128i *)buf);
}
FD_INLINE __m256 load_floats_tail(const float *p, int n) {
    float buf[8] = {0};
    memcpy(buf, p, sizeof(float) * (size_t)(n < 8 ? n : 8));
    return _mm256_loadu_ps(buf);
}

/* Two partial sums per (row, activation row) so consecutive FMAs do not wait on each other. */
FD_INLINE void fp8_dot_rm(const uint8_t *w, size_t ws, const float *tile_scale, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M) {
    __m256 acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm256_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += 128) {
        const int k1 = k0 + 128 < K ? k0 + 128 : K;
        __m256 p0[2][FD_DOT_MAX_M], p1[2][FD_DOT_MAX_M];
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++) p0[i][t] = p1[i][t] = _mm256_setzero_ps();
        int k = k0;
        for (; k + 16 <= k1; k += 16) {
            for (int i = 0; i < R; i++) {
                __m256 wv[2];
                e4m3_decode16(_mm_loadu_si128((const __m128i *)(w + (size_t)i * ws + k)), wv);
                for (int t = 0; t < M; t++) {
                    p0[i][t] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(x[t] + k), p0[i][t]);
                    p1[i][t] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(x[t] + k + 8), p1[i][t]);
                }
            }
        }
        if (k < k1) { /* ragged end of the last tile: zero-padded */
            const int n = k1 - k;
            for (int i = 0; i < R; i++) {
                __m256 wv[2];
                e4m3_decode16(load_bytes_tail(w + (size_t)i * ws + k, n), wv);
                for (int t = 0; t < M; t++) {
                    __m256 xa = load_floats_tail(x[t] + k, n);
                    __m256 xb = n > 8 ? load_floats_tail(x[t] + k + 8, n - 8) : _mm256_setzero_ps();
                    p0[i][t] = _mm256_fmadd_ps(wv[0], xa, p0[i][t]);
                    p1[i][t] = _mm256_fmadd_ps(wv[1], xb, p1[i][t]);
                }
            }
        }
        const __m256 sc = _mm256_set1_ps(tile_scale[k0 / 128]), two8 = _mm256_set1_ps(256.0f);
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++) {
                __m256 part = _mm256_mul_ps(_mm256_add_ps(p0[i][t], p1[i][t]), two8);
                acc[i][t] = _mm256_fmadd_ps(part, sc, acc[i][t]);
            }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = hsum256(acc[i][t]);
}

static void fp8_dot_avx2(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                         const float *const *x, int m, float *y, size_t ys) {
    int r = 0;
    if (m <= 2) /* two rows at a time while the registers allow it */
        for (; r + 2 <= rows; r += 2) {
            const uint8_t *wr = w + (size_t)r * ws;
            if (m == 1)
                fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 2, 1);
            else
                fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 2, 2);
        }
    for (; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        FD_SWITCH_M4(m, fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 1, FD_M))
    }
}

static void fp8_decode_avx2(const uint8_t *w, const float *tile_scale, int K, float *dst) {
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 v[2];
        e4m3_decode16(_mm_loadu_si128((const __m128i *)(w + k)), v);
        const __m256 sc = _mm256_set1_ps(tile_scale[k / 128]), two8 = _mm256_set1_ps(256.0f);
        _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_mul_ps(v[0], two8), sc));
        _mm256_storeu_ps(dst + k + 8, _mm256_mul_ps(_mm256_mul_ps(v[1], two8), sc));
    }
    for (; k < K; k++) dst[k] = fd_e4m3_f32[w[k]] * tile_scale[k / 128];
}

/* N weight rows x M activation rows of fp32 dots, 8 lanes; the K tail zero-padded. */
/* bf16 weights: 8 widened to fp32 per step (zero-extend, shift into the high half: exact); two
 * partial sums per (row, activation row); the ragged end of a row in scalar code. */
FD_INLINE void bf16_dot_rm(const uint16_t *w, size_t ws, int K, const float *const *x, float *y,
                           size_t ys, const int R, const int M) {
    __m256 acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) xv[t] = _mm256_loadu_ps(x[t] + k);
        for (int i = 0; i < R; i++) {
            const uint16_t *wk = w + (size_t)i * ws + k;
            const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)wk)), 16));
            for (int t = 0; t < M; t++) acc[i][t] = _mm256_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) {
            float v = hsum256(acc[i][t]);
            for (int kk = k; kk < K; kk++) v += fd_bf16_f32(w[(size_t)i * ws + kk]) * x[t][kk];
            y[(size_t)t * ys + i] = v;
        }
}

static void bf16_dot_avx2(const uint16_t *w, size_t ws, int rows, int K, const float *const *x,
                          int m, float *y, size_t ys) {
    for (int r = 0; r < rows; r += (rows - r >= 2 ? 2 : 1)) {
        const uint16_t *wr = w + (size_t)r * ws;
        if (rows - r >= 2) {
            FD_SWITCH_M4(m, bf16_dot_rm(wr, ws, K, x, y + r, ys, 2, FD_M))
        } else {
            FD_SWITCH_M4(m, bf16_dot_rm(wr, ws, K, x, y + r, ys, 1, FD_M))
        }
    }
}

FD_INLINE void gemm_rm(const float *const *x, const float *w, size_t ldw, int K, float *y,
                       size_t ys, const int N, const int M) {
    __m256 acc[2][4];
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) acc[j][t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[4];
        for (int t = 0; t < M; t++) xv[t] = _mm256_loadu_ps(x[t] + k);
        for (int j = 0; j < N; j++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)j * ldw + k);
            for (int t = 0; t < M; t++) acc[j][t] = _mm256_fmadd_ps(xv[t], wv, acc[j][t]);
        }
    }
    if (k < K) {
        __m256 xv[4];
        for (int t = 0; t < M; t++) xv[t] = load_floats_tail(x[t] + k, K - k);
        for (int j = 0; j < N; j++) {
            __m256 wv = load_floats_tail(w + (size_t)j * ldw + k, K - k);
            for (int t = 0; t < M; t++) acc[j][t] = _mm256_fmadd_ps(xv[t], wv, acc[j][t]);
        }
    }
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + j] = hsum256(acc[j][t]);
}

static void gemm_f32_avx2(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                          float *y, size_t ys) {
    for (int t = 0; t < m; t += 4) {
        const int mt = m - t < 4 ? m - t : 4;
        const float *const *xt = x + t;
        float *yt = y + (size_t)t * ys;
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const float *wj = w + (size_t)j * ldw;
            FD_SWITCH_M4(mt, gemm_rm(xt, wj, ldw, K, yt + j, ys, 2, FD_M))
        }
        for (; j < n; j++) {
            const float *wj = w + (size_t)j * ldw;
            FD_SWITCH_M4(mt, gemm_rm(xt, wj, ldw, K, yt + j, ys, 1, FD_M))
        }
    }
}

/* Index scores: the tile's 32 rows in four registers, two heads' dot products in flight (eight
 * FMA chains), each head's q[h][d] broadcast once per d against row element d of the rows. */
static void index_tile_avx2(const float *q, const float *w, int H, int D, const float *kt,
                            float *out) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 total[4] = {zero, zero, zero, zero};
    int h = 0;
    for (; h + 2 <= H; h += 2) {
        const float *qh = q + (size_t)h * D;
        __m256 a[2][4];
        for (int g = 0; g < 2; g++)
            for (int v = 0; v < 4; v++) a[g][v] = zero;
        for (int d = 0; d < D; d++) {
            __m256 k[4];
            for (int v = 0; v < 4; v++) k[v] = _mm256_load_ps(kt + (size_t)d * FD_INDEX_TILE + 8 * v);
            for (int g = 0; g < 2; g++) {
                const __m256 b = _mm256_broadcast_ss(qh + (size_t)g * D + d);
                for (int v = 0; v < 4; v++) a[g][v] = _mm256_fmadd_ps(b, k[v], a[g][v]);
            }
        }
        for (int g = 0; g < 2; g++) {
            const __m256 wg = _mm256_broadcast_ss(w + h + g);
            for (int v = 0; v < 4; v++)
                total[v] = _mm256_fmadd_ps(wg, _mm256_max_ps(a[g][v], zero), total[v]);
        }
    }
    for (; h < H; h++) {
        __m256 a[4] = {zero, zero, zero, zero};
        for (int d = 0; d < D; d++) {
            const __m256 b = _mm256_broadcast_ss(q + (size_t)h * D + d);
            for (int v = 0; v < 4; v++)
                a[v] = _mm256_fmadd_ps(b, _mm256_load_ps(kt + (size_t)d * FD_INDEX_TILE + 8 * v), a[v]);
        }
        const __m256 wh = _mm256_broadcast_ss(w + h);
        for (int v = 0; v < 4; v++) total[v] = _mm256_fmadd_ps(wh, _mm256_max_ps(a[v], zero), total[v]);
    }
    for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + 8 * v, total[v]);
}

const fd_quant_kernels fd_kernels_avx2 = {
    "avx2", FD_FP4_QUADS, fp4_dot_avx2, fp4_decode_avx2, fp8_dot_avx2, fp8_decode_avx2, gemm_f32_avx2, NULL, FD_FP4_NATURAL, bf16_dot_avx2, NULL, NULL, NULL,
    index_tile_avx2, FD_FP8_NATURAL, fp4_dot_q8_rows, FD_FP4_PAIRS,
};
