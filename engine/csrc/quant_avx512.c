/* AVX-512 (F/BW/VL/DQ) variant of the quant primitives; compiled with AVX-512 flags only here.
 *
 * FP4: a 64-byte load (a 128-element chunk of 4 blocks) is 16 dwords of 8 nibbles; vpermps with
 * the 16-entry E2M1 table reads the low 4 bits of each dword, so a shift and a permute per nibble
 * plane decode the chunk (FD_FP4_PLANES8, activations permuted once per call to match). Each
 * lane sums one block's products; the chunk's four E8M0 scales are applied once, as a vector, as
 * the scalar reference applies each block's scale to its partial sum. FP8: E4M3 bits are moved into an fp16 exponent and
 * mantissa by shifts into an fp16, converted with vcvtph2ps, NaN codes patched by a mask.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "fd_platform.h"
#include "quant_kernels.h"

/* Row order of the dot kernels, measured on the dev VM's EPYC (same-process A/B runs): weight rows
 * are read one at a time, start to end, so each thread streams one sequential run of memory (FP4
 * experts 40 -> 44 GB/s against four interleaved row streams, the BF16 head 41 -> 45, FP8 rows
 * of 1-4 KiB 34 -> 44); each 64-byte FP4 load also prefetches the same chunk two rows on (2-4 KiB
 * ahead; four interleaved rows with next-group prefetch had gone 33 -> 40). Only FP8 rows longer
 * than FD_FP8_GROUP_K bytes keep groups of four rows, which share each activation load, with
 * each row prefetched 2 KiB ahead (8 KiB rows: 46 -> 57 GB/s; shorter rows lose with it). */
#define FD_PF_ROWS 2
#define FD_FP8_GROUP_K 4096

FD_INLINE __m512 fp4_lut(void) {
    return _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f,
                          -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
}

/* The scale vector of one 128-element chunk: dword l = 2^(s[l/4] - 127), the lane->block map of
 * both plane layouts. Fast form: the byte shifted into a float's exponent field, exact for bytes
 * 1..254; rows with a 0 (2^-127, subnormal) or 255 (NaN) byte use the table form instead. */
FD_INLINE __m512 chunk_scales(const uint8_t *s) {
    uint32_t v;
    memcpy(&v, s, sizeof v);
    const __m512i pick = _mm512_setr_epi32(
        (int)0x80808000, (int)0x80808000, (int)0x80808000, (int)0x80808000, (int)0x80808001,
        (int)0x80808001, (int)0x80808001, (int)0x80808001, (int)0x80808002, (int)0x80808002,
        (int)0x80808002, (int)0x80808002, (int)0x80808003, (int)0x80808003, (int)0x80808003,
        (int)0x80808003);
    __m512i b = _mm512_shuffle_epi8(_mm512_set1_epi32((int)v), pick);
    return _mm512_castsi512_ps(_mm512_slli_epi32(b, 23));
}

FD_INLINE __m512 chunk_scales_table(const uint8_t *s) {
    const __m128 q = _mm_setr_ps(fd_e8m0_f32[s[0]], fd_e8m0_f32[s[1]], fd_e8m0_f32[s[2]],
                                 fd_e8m0_f32[s[3]]);
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(q));
}

/* Whether any of R rows' first n scale bytes is 0 or 255 (needs chunk_scales_table). */
static int special_scales(const uint8_t *s, size_t ss, int R, int n) {
    const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi8(-1);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < n; j += 64) {
            const __mmask64 mk = n - j >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - j)) - 1);
            __m512i v = _mm512_maskz_loadu_epi8(mk, s + (size_t)i * ss + j);
            if ((_mm512_mask_cmpeq_epi8_mask(mk, v, zero) | _mm512_mask_cmpeq_epi8_mask(mk, v, ones)))
                return 1;
        }
    return 0;
}

/* R rows x M activation rows, both compile-time constants after inlining, and TABLE (scale form).
 * Full chunks: one 64-byte load per row, eight nibble planes (shift + vpermps each), summed per
 * lane into blk, then one FMA with the chunk's scale vector. Remaining blocks: per block, low
 * and high nibbles (FD_FP4_EVEN_ODD), scaled by the table. */
FD_INLINE void fp4_dot_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M,
                          const int TABLE) {
    const __m512 lut = fp4_lut();
    __m512 acc[4][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm512_setzero_ps();
    const int nc = K / FD_FP4_CHUNK, nb = K / 32;
    for (int c = 0; c < nc; c++) {
        for (int i = 0; i < R; i++) {
            const uint8_t *wc = w + (size_t)i * ws + (size_t)c * 64;
            _mm_prefetch((const char *)(wc + FD_PF_ROWS * ws), _MM_HINT_T0);
            const __m512i d = _mm512_loadu_si512((const void *)wc);
            __m512 blk[FD_DOT_MAX_M];
            for (int p = 0; p < 8; p++) {
                const __m512 wv = _mm512_permutexvar_ps(p ? _mm512_srli_epi32(d, 4 * p) : d, lut);
                for (int t = 0; t < M; t++) {
                    const __m512 xv = _mm512_loadu_ps(x[t] + c * FD_FP4_CHUNK + 16 * p);
                    blk[t] = p ? _mm512_fmadd_ps(wv, xv, blk[t]) : _mm512_mul_ps(wv, xv);
                }
            }
            const uint8_t *sc4 = s + (size_t)i * ss + (size_t)c * 4;
            const __m512 sc = TABLE ? chunk_scales_table(sc4) : chunk_scales(sc4);
            for (int t = 0; t < M; t++) acc[i][t] = _mm512_fmadd_ps(blk[t], sc, acc[i][t]);
        }
    }
    for (int b = nc * 4; b < nb; b++) {
        __m512 xe[FD_DOT_MAX_M], xo[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) {
            xe[t] = _mm512_loadu_ps(x[t] + b * 32);
            xo[t] = _mm512_loadu_ps(x[t] + b * 32 + 16);
        }
        for (int i = 0; i < R; i++) {
            const uint8_t *wb = w + (size_t)i * ws + (size_t)b * 16;
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb));
            __m512 lo = _mm512_permutexvar_ps(d, lut);
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), lut);
            __m512 sc = _mm512_set1_ps(fd_e8m0_f32[s[(size_t)i * ss + b]]);
            for (int t = 0; t < M; t++) {
                __m512 p = _mm512_fmadd_ps(hi, xo[t], _mm512_mul_ps(lo, xe[t]));
                acc[i][t] = _mm512_fmadd_ps(p, sc, acc[i][t]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = _mm512_reduce_add_ps(acc[i][t]);
}

/* One row at a time (see FD_PF_ROWS); each row picks its scale form by scanning its scales. */
#define FP4_DOT_ROWS(fn)                                                                       \
    const int nc4 = (K / FD_FP4_CHUNK) * 4;                                                    \
    int r = 0;                                                                                 \
    for (; r < rows; r++) {                                                                    \
        const uint8_t *wr = w + (size_t)r * ws;                                                \
        const uint8_t *sr = s + (size_t)r * ss;                                                \
        if (!special_scales(sr, ss, 1, nc4))                                                   \
            FD_SWITCH_M4(m, fn(wr, ws, sr, ss, K, x, y + r, ys, 1, FD_M, 0))                   \
        else                                                                                   \
            FD_SWITCH_M4(m, fn(wr, ws, sr, ss, K, x, y + r, ys, 1, FD_M, 1))                   \
    }

static void fp4_dot_avx512(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                           int K, const float *const *x, int m, float *y, size_t ys) {
    FP4_DOT_ROWS(fp4_dot_rm)
}

static void fp4_decode_avx512(const uint8_t *w, const uint8_t *s, int K, float *dst) {
    const __m512 lut = fp4_lut();
    const int nc = K / FD_FP4_CHUNK;
    for (int c = 0; c < nc; c++) {
        const __m512i d = _mm512_loadu_si512((const void *)(w + (size_t)c * 64));
        const __m512 sc = chunk_scales_table(s + (size_t)c * 4);
        for (int p = 0; p < 8; p++)
            _mm512_storeu_ps(dst + c * FD_FP4_CHUNK + 16 * p,
                             _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4 * p), lut), sc));
    }
    for (int b = nc * 4; b < K / 32; b++) {
        __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + b * 16)));
        __m512 sc = _mm512_set1_ps(fd_e8m0_f32[s[b]]);
        _mm512_storeu_ps(dst + b * 32, _mm512_mul_ps(_mm512_permutexvar_ps(d, lut), sc));
        _mm512_storeu_ps(dst + b * 32 + 16,
                         _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), lut), sc));
    }
}

/* ---- FP4 x int8 (fp4_dot_q8): the 512-bit form of quant_q8_avx2.h. One 64-byte load holds four
 * blocks; its nibbles, looked up with vpshufb, are 2 x E2M1 + 12 (unsigned), the activations are in
 * FD_FP4_QUADS4 order, and dword lanes 4j..4j+3 of the unsigned-times-signed dot belong to block
 * j of the four. The + 12 comes off through the blocks' sums of q (one multiply-add per sixteen
 * blocks). VNNI (vpdpbusd) where the variant's CPUs all have it (avx512_bf16); the avx512
 * variant, which also runs on Skylake-X, uses vpmaddubsw + vpmaddwd. */
FD_INLINE __m512i q8_dot2_512(__m512i a0, __m512i b0, __m512i a1, __m512i b1, const int VNNI) {
    if (VNNI)
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a0, b0), a1, b1);
    /* 16-bit pair sums are at most 2 * 24 * 127: two of them add without saturating */
    return _mm512_madd_epi16(
        _mm512_add_epi16(_mm512_maddubs_epi16(a0, b0), _mm512_maddubs_epi16(a1, b1)),
        _mm512_set1_epi16(1));
}

/* Sixteen E8M0 bytes -> 2^(e-127) in lane j, as fd_e8m0_f32 (0: 2^-127; 255: NaN). */
FD_INLINE __m512 q8_e8m0x16(const uint8_t *s) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s));
    __m512i bits = _mm512_slli_epi32(e, 23);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                                 _mm512_set1_epi32(0x00400000));
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)),
                                 _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(bits);
}

/* One block's dot in the scalar form, its activations wherever the layout put them: the blocks
 * after the last whole four (K not a multiple of 128; not at V4-Flash's dims). */
static int32_t q8_block_dot(const uint8_t *wb, const int8_t *q, int K, int b) {
    int32_t sum = 0;
    for (int j = 0; j < 16; j++) {
        sum += fd_e2m1_x2[wb[j] & 15] * q[fd_fp4_perm_index(FD_FP4_QUADS4, 32 * b + 2 * j, K)];
        sum += fd_e2m1_x2[wb[j] >> 4] * q[fd_fp4_perm_index(FD_FP4_QUADS4, 32 * b + 2 * j + 1, K)];
    }
    return sum;
}

FD_INLINE void fp4_q8_rm512(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                            const int8_t *const *xq, const float *const *xd, float *y, size_t ys,
                            const int R, const int M, const int VNNI) {
    const __m512i lut = _mm512_broadcast_i32x4(
        _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512 twelve = _mm512_set1_ps(12.0f);
    __m512 acc[2][FD_DOT_MAX_M];
    float tail[2][FD_DOT_MAX_M]; /* the blocks after the last whole four, in scalar form */
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm512_setzero_ps(), tail[i][t] = 0.0f;
    const int nb = K / 32, n4 = nb & ~3;
    int b = 0;
#define FD_Q8_QUAD(i, wp, b_)                                                                      \
    do {                                                                                           \
        const __m512i bytes = _mm512_loadu_si512((const void *)(wp));                              \
        const __m512i wl = _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, nib));                 \
        const __m512i wh =                                                                         \
            _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nib));          \
        for (int t = 0; t < M; t++) {                                                              \
            const int8_t *qp = xq[t] + (size_t)(b_) * 32;                                          \
            const __m512i sum = q8_dot2_512(wl, _mm512_loadu_si512((const void *)qp), wh,          \
                                            _mm512_loadu_si512((const void *)(qp + 64)), VNNI);    \
            acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), quad_scale[t], acc[i][t]);        \
        }                                                                                          \
    } while (0)
    for (; b + 16 <= n4; b += 16)
        for (int i = 0; i < R; i++) {
            const uint8_t *wr = w + (size_t)i * ws + (size_t)b * 16;
            _mm_prefetch((const char *)(wr + 2048), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + 2112), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + 2176), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + 2240), _MM_HINT_T0);
            const __m512 sw = q8_e8m0x16(s + (size_t)i * ss + b);
            __m512 scale16[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) {
                scale16[t] = _mm512_mul_ps(sw, _mm512_loadu_ps(xd[t] + b));
                const __m512 sums = _mm512_loadu_ps(xd[t] + nb + b);
                acc[i][t] = _mm512_fnmadd_ps(_mm512_mul_ps(sums, twelve), scale16[t], acc[i][t]);
            }
            for (int g = 0; g < 4; g++) {
                const __m512i pick = _mm512_setr_epi32(4 * g, 4 * g, 4 * g, 4 * g, 4 * g + 1,
                                                       4 * g + 1, 4 * g + 1, 4 * g + 1, 4 * g + 2,
                                                       4 * g + 2, 4 * g + 2, 4 * g + 2, 4 * g + 3,
                                                       4 * g + 3, 4 * g + 3, 4 * g + 3);
                __m512 quad_scale[FD_DOT_MAX_M];
                for (int t = 0; t < M; t++) quad_scale[t] = _mm512_permutexvar_ps(pick, scale16[t]);
                FD_Q8_QUAD(i, wr + 64 * g, b + 4 * g);
            }
        }
    for (; b < n4; b += 4) /* whole fours after the last sixteen blocks */
        for (int i = 0; i < R; i++) {
            const uint8_t *sr = s + (size_t)i * ss + b;
            __m512 quad_scale[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) {
                float c[4];
                for (int j = 0; j < 4; j++) {
                    c[j] = fd_e8m0_f32[sr[j]] * xd[t][b + j];
                    tail[i][t] -= 6.0f * c[j] * xd[t][nb + b + j]; /* 1/2 x 12 */
                }
                quad_scale[t] = _mm512_permutexvar_ps(
                    _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                    _mm512_castps128_ps512(_mm_loadu_ps(c)));
            }
            FD_Q8_QUAD(i, w + (size_t)i * ws + (size_t)b * 16, b);
        }
#undef FD_Q8_QUAD
    for (; b < nb; b++) /* the last one to three blocks */
        for (int i = 0; i < R; i++) {
            const uint8_t *wb = w + (size_t)i * ws + (size_t)b * 16;
            const float sw = fd_e8m0_f32[s[(size_t)i * ss + b]];
            for (int t = 0; t < M; t++)
                tail[i][t] += 0.5f * (float)q8_block_dot(wb, xq[t], K, b) * (sw * xd[t][b]);
        }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++)
            y[(size_t)t * ys + i] = 0.5f * _mm512_reduce_add_ps(acc[i][t]) + tail[i][t];
}

/* 16 E4M3 bytes -> 16 floats equal to the E4M3 values times 2^-8, exactly: the sign-extended
 * byte shifted left 7 is the fp16 with the same sign, exponent and mantissa fields (bias 15 for
 * 7, so E4M3 subnormals stay fp16 subnormals), converted by vcvtph2ps; NaN codes patched. The
 * 2^8 goes onto each tile's partial sum, which is exact. */
FD_INLINE __m512 e4m3_decode16_finite(__m128i bytes) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                 _mm256_set1_epi16((short)0xBF80));
    return _mm512_cvtph_ps(h);
}

FD_INLINE __m512 e4m3_decode16(__m128i bytes) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                 _mm256_set1_epi16((short)0xBF80));
    const __m256i all = _mm256_set1_epi16(0x3F80);
    __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, all), all);
    return _mm512_mask_mov_ps(_mm512_cvtph_ps(h), nan, _mm512_set1_ps(NAN));
}


FD_INLINE void fp8_dot_rm(const uint8_t *w, size_t ws, const float *tile_scale, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M,
                          const int NANS) {
    __m512 acc[4][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += 128) {
        const int k1 = k0 + 128 < K ? k0 + 128 : K;
        __m512 part[4][FD_DOT_MAX_M];
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++) part[i][t] = _mm512_setzero_ps();
        int k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m512 xv[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) xv[t] = _mm512_loadu_ps(x[t] + k);
            for (int i = 0; i < R; i++) {
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(w + (size_t)i * ws + k));
                if (R > 1 && !(k & 63)) /* row groups: each row 2 KiB ahead (see FD_PF_ROWS) */
                    _mm_prefetch((const char *)(w + (size_t)i * ws + k) + 2048, _MM_HINT_T0);
                __m512 wv = NANS ? e4m3_decode16(bytes) : e4m3_decode16_finite(bytes);
                for (int t = 0; t < M; t++) part[i][t] = _mm512_fmadd_ps(wv, xv[t], part[i][t]);
            }
        }
        if (k < k1) { /* ragged end of the last tile */
            const __mmask16 mk = (__mmask16)((1u << (k1 - k)) - 1u);
            __m512 xv[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x[t] + k);
            for (int i = 0; i < R; i++) {
                __m512 wv = e4m3_decode16(_mm_maskz_loadu_epi8(mk, w + (size_t)i * ws + k));
                for (int t = 0; t < M; t++) part[i][t] = _mm512_fmadd_ps(wv, xv[t], part[i][t]);
            }
        }
        const __m512 sc = _mm512_set1_ps(tile_scale[k0 / 128]), two8 = _mm512_set1_ps(256.0f);
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++)
                acc[i][t] = _mm512_fmadd_ps(_mm512_mul_ps(part[i][t], two8), sc, acc[i][t]);
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = _mm512_reduce_add_ps(acc[i][t]);
}

#define FP8_DOT_ROWS(NANS)                                                                     \
    const int group = K > FD_FP8_GROUP_K ? 4 : 1;                                              \
    for (int r = 0; r < rows; r += (rows - r >= group ? group : 1)) {                          \
        const uint8_t *wr = w + (size_t)r * ws;                                                \
        if (group == 4 && rows - r >= 4)                                                       \
            FD_SWITCH_M4(m, fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 4, FD_M, NANS))    \
        else                                                                                   \
            FD_SWITCH_M4(m, fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 1, FD_M, NANS))    \
    }

static void fp8_dot_avx512(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                           const float *const *x, int m, float *y, size_t ys) {
    FP8_DOT_ROWS(1)
}

/* The same without the NaN patch: ~14% faster on the dev VM (6 vs 8 instructions per 16). */
static void fp8_dot_finite_avx512(const uint8_t *w, size_t ws, const float *tile_scale, int rows,
                                  int K, const float *const *x, int m, float *y, size_t ys) {
    FP8_DOT_ROWS(0)
}

static void fp8_decode_avx512(const uint8_t *w, const float *tile_scale, int K, float *dst) {
    for (int k = 0; k < K; k += 16) {
        const int n = K - k < 16 ? K - k : 16;
        const __mmask16 mk = (__mmask16)((1u << n) - 1u);
        __m512 v = e4m3_decode16(_mm_maskz_loadu_epi8(mk, w + k));
        v = _mm512_mul_ps(v, _mm512_set1_ps(256.0f));
        _mm512_mask_storeu_ps(dst + k, mk, _mm512_mul_ps(v, _mm512_set1_ps(tile_scale[k / 128])));
    }
}

/* 16 bf16 weights widened to fp32: zero-extend to dwords, move into the high half (exact). */
FD_INLINE __m512 bf16x16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FD_INLINE void bf16_dot_rm(const uint16_t *w, size_t ws, int K, const float *const *x, float *y,
                           size_t ys, const int R, const int M) {
    __m512 acc[4][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) xv[t] = _mm512_loadu_ps(x[t] + k);
        for (int i = 0; i < R; i++) {
            if (!(k & 31)) /* each 64-byte line: the line 2 KiB ahead (head: 39 -> 41-43 GB/s) */
                _mm_prefetch((const char *)(w + (size_t)i * ws + k) + 2048, _MM_HINT_T0);
            const __m512 wv = bf16x16(_mm256_loadu_si256((const __m256i *)(w + (size_t)i * ws + k)));
            for (int t = 0; t < M; t++) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
    if (k < K) {
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xv[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x[t] + k);
        for (int i = 0; i < R; i++) {
            const __m512 wv = bf16x16(_mm256_maskz_loadu_epi16(mk, w + (size_t)i * ws + k));
            for (int t = 0; t < M; t++) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = _mm512_reduce_add_ps(acc[i][t]);
}

static void bf16_dot_avx512(const uint16_t *w, size_t ws, int rows, int K, const float *const *x,
                            int m, float *y, size_t ys) {
    for (int r = 0; r < rows; r++) { /* one row at a time (see FD_PF_ROWS) */
        const uint16_t *wr = w + (size_t)r * ws;
        FD_SWITCH_M4(m, bf16_dot_rm(wr, ws, K, x, y + r, ys, 1, FD_M))
    }
}

FD_INLINE void gemm_rm(const float *const *x, const float *w, size_t ldw, int K, float *y,
                       size_t ys, const int N, const int M) {
    __m512 acc[4][4];
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) acc[j][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[4];
        for (int t = 0; t < M; t++) xv[t] = _mm512_loadu_ps(x[t] + k);
        for (int j = 0; j < N; j++) {
            __m512 wv = _mm512_loadu_ps(w + (size_t)j * ldw + k);
            for (int t = 0; t < M; t++) acc[j][t] = _mm512_fmadd_ps(xv[t], wv, acc[j][t]);
        }
    }
    if (k < K) {
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xv[4];
        for (int t = 0; t < M; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x[t] + k);
        for (int j = 0; j < N; j++) {
            __m512 wv = _mm512_maskz_loadu_ps(mk, w + (size_t)j * ldw + k);
            for (int t = 0; t < M; t++) acc[j][t] = _mm512_fmadd_ps(xv[t], wv, acc[j][t]);
        }
    }
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + j] = _mm512_reduce_add_ps(acc[j][t]);
}

/* Many activation rows: transpose the (at most 16) weight rows into a panel [K][16] once, then
 * each k is one panel load and one broadcast-FMA per activation row into 16-row accumulators
 * (no horizontal sums, panel reused by every row group). */
#define PANEL_ROWS 16
#define PANEL_TOKENS 8
#define PANEL_MIN_M 64 /* below this the transpose costs more than the dot kernel loses */

FD_INLINE void panel_tokens(const float *const *x, const float *panel, int K, float *y, size_t ys,
                            __mmask16 rows, const int M) {
    __m512 acc[PANEL_TOKENS];
    for (int t = 0; t < M; t++) acc[t] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 p = _mm512_load_ps(panel + (size_t)k * PANEL_ROWS);
        for (int t = 0; t < M; t++) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(x[t][k]), p, acc[t]);
    }
    for (int t = 0; t < M; t++) _mm512_mask_storeu_ps(y + (size_t)t * ys, rows, acc[t]);
}

static int gemm_panel(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                      float *y, size_t ys) {
    float *panel = (float *)fd_aligned_alloc(sizeof(float) * PANEL_ROWS * (size_t)K);
    if (!panel) return -1;
    const __mmask16 rows = (__mmask16)((1u << n) - 1u);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)ldw));
    for (int k = 0; k < K; k++)
        _mm512_store_ps(panel + (size_t)k * PANEL_ROWS,
                        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, w + k, 4));
    for (int t = 0; t < m; t += PANEL_TOKENS) {
        const float *const *xt = x + t;
        float *yt = y + (size_t)t * ys;
        switch (m - t < PANEL_TOKENS ? m - t : PANEL_TOKENS) {
        case 1: panel_tokens(xt, panel, K, yt, ys, rows, 1); break;
        case 2: panel_tokens(xt, panel, K, yt, ys, rows, 2); break;
        case 3: panel_tokens(xt, panel, K, yt, ys, rows, 3); break;
        case 4: panel_tokens(xt, panel, K, yt, ys, rows, 4); break;
        case 5: panel_tokens(xt, panel, K, yt, ys, rows, 5); break;
        case 6: panel_tokens(xt, panel, K, yt, ys, rows, 6); break;
        case 7: panel_tokens(xt, panel, K, yt, ys, rows, 7); break;
        default: panel_tokens(xt, panel, K, yt, ys, rows, 8); break;
        }
    }
    fd_aligned_free(panel);
    return 0;
}

static void gemm_f32_avx512(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                            float *y, size_t ys) {
    if (m >= PANEL_MIN_M && n <= PANEL_ROWS && (size_t)PANEL_ROWS * ldw < ((size_t)1 << 31) &&
        gemm_panel(x, m, w, ldw, n, K, y, ys) == 0) return;
    for (int t = 0; t < m; t += 4) {
        const int mt = m - t < 4 ? m - t : 4;
        const float *const *xt = x + t;
        float *yt = y + (size_t)t * ys;
        int j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *wj = w + (size_t)j * ldw;
            FD_SWITCH_M4(mt, gemm_rm(xt, wj, ldw, K, yt + j, ys, 4, FD_M))
        }
        for (; j < n; j++) {
            const float *wj = w + (size_t)j * ldw;
            FD_SWITCH_M4(mt, gemm_rm(xt, wj, ldw, K, yt + j, ys, 1, FD_M))
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && !defined(_MSC_VER)
/* bf16 activations against FP4 weights decoded straight to bf16 by vpermw from this table of the
 * 16 E2M1 values (vpermw reads the low 5 bits of each word index, so the table repeats). */
FD_INLINE __m512i fp4_bf16_table(void) {
    return _mm512_set_epi16(
        (short)0xC0C0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBFC0, (short)0xBF80,
        (short)0xBF00, (short)0x8000, 0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0,
        (short)0xC0C0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBFC0, (short)0xBF80,
        (short)0xBF00, (short)0x8000, 0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0);
}

/* Full chunks (FD_FP4_PLANES4 activations): one 64-byte load per row is 32 words; the word
 * shifted by 4p holds the code of element 4w+p in its low bits, so four vpermw give the chunk's
 * 128 weights as bf16 and four vdpbf16ps sum them per lane into blk (dword l: block l/4), then
 * one FMA applies the chunk's scale vector. Remaining blocks (natural order): per block, the
 * index dword j = b | b << 12 holds word 2j = b and word 2j+1 = b >> 4, so one vpermw yields the
 * 32 weights of the block in element order. Products of bf16 and E2M1 values are exact in fp32. */
FD_INLINE void fp4_dot_bf16_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                               const uint16_t *const *x, float *y, size_t ys, const int R,
                               const int M, const int TABLE) {
    const __m512i table = fp4_bf16_table();
    __m512 acc[4][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = _mm512_setzero_ps();
    const int nc = K / FD_FP4_CHUNK, nb = K / 32;
    for (int c = 0; c < nc; c++) {
        for (int i = 0; i < R; i++) {
            const uint8_t *wc = w + (size_t)i * ws + (size_t)c * 64;
            _mm_prefetch((const char *)(wc + FD_PF_ROWS * ws), _MM_HINT_T0);
            const __m512i d = _mm512_loadu_si512((const void *)wc);
            __m512 blk[FD_DOT_MAX_M];
            for (int t = 0; t < M; t++) blk[t] = _mm512_setzero_ps();
            for (int p = 0; p < 4; p++) {
                const __m512i wv =
                    _mm512_permutexvar_epi16(p ? _mm512_srli_epi16(d, 4 * p) : d, table);
                for (int t = 0; t < M; t++) {
                    const __m512i xv =
                        _mm512_loadu_si512((const void *)(x[t] + c * FD_FP4_CHUNK + 32 * p));
                    blk[t] = _mm512_dpbf16_ps(blk[t], (__m512bh)wv, (__m512bh)xv);
                }
            }
            const uint8_t *sc4 = s + (size_t)i * ss + (size_t)c * 4;
            const __m512 sc = TABLE ? chunk_scales_table(sc4) : chunk_scales(sc4);
            for (int t = 0; t < M; t++) acc[i][t] = _mm512_fmadd_ps(blk[t], sc, acc[i][t]);
        }
    }
    for (int b = nc * 4; b < nb; b++) {
        __m512i xv[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) xv[t] = _mm512_loadu_si512((const void *)(x[t] + b * 32));
        for (int i = 0; i < R; i++) {
            const uint8_t *wb = w + (size_t)i * ws + (size_t)b * 16;
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb));
            __m512i wv = _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), table);
            __m512 sc = _mm512_set1_ps(fd_e8m0_f32[s[(size_t)i * ss + b]]);
            for (int t = 0; t < M; t++) {
                __m512 blk = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wv, (__m512bh)xv[t]);
                acc[i][t] = _mm512_fmadd_ps(blk, sc, acc[i][t]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = _mm512_reduce_add_ps(acc[i][t]);
}

static void fp4_dot_bf16_avx512(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                                int K, const uint16_t *const *x, int m, float *y, size_t ys) {
    FP4_DOT_ROWS(fp4_dot_bf16_rm)
}
#define FD_FP4_DOT_BF16 fp4_dot_bf16_avx512
#define FD_FP4_BF16_LAYOUT FD_FP4_PLANES4

/* N weight rows x M activation rows, 32 elements per step: N + M loads feed N*M vdpbf16ps (each
 * 32 multiply-adds, twice an fp32 FMA's), one horizontal sum per output at the end. */
FD_INLINE void gemm_bf16_rm(const uint16_t *const *x, const uint16_t *w, size_t ldw, int K,
                            float *y, size_t ys, const int N, const int M) {
    __m512 acc[4][4];
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) acc[j][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i xv[4];
        for (int t = 0; t < M; t++) xv[t] = _mm512_loadu_si512((const void *)(x[t] + k));
        for (int j = 0; j < N; j++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)j * ldw + k));
            for (int t = 0; t < M; t++)
                acc[j][t] = _mm512_dpbf16_ps(acc[j][t], (__m512bh)wv, (__m512bh)xv[t]);
        }
    }
    if (k < K) { /* zeros past K pair with zeros */
        const __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1ull);
        __m512i xv[4];
        for (int t = 0; t < M; t++) xv[t] = _mm512_maskz_loadu_epi16(mk, x[t] + k);
        for (int j = 0; j < N; j++) {
            const __m512i wv = _mm512_maskz_loadu_epi16(mk, w + (size_t)j * ldw + k);
            for (int t = 0; t < M; t++)
                acc[j][t] = _mm512_dpbf16_ps(acc[j][t], (__m512bh)wv, (__m512bh)xv[t]);
        }
    }
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + j] = _mm512_reduce_add_ps(acc[j][t]);
}

static void gemm_bf16_avx512(const uint16_t *const *x, int m, const uint16_t *w, size_t ldw,
                             int n, int K, float *y, size_t ys) {
    for (int t = 0; t < m; t += 4) {
        const int mt = m - t < 4 ? m - t : 4;
        const uint16_t *const *xt = x + t;
        float *yt = y + (size_t)t * ys;
        int j = 0;
        for (; j + 4 <= n; j += 4)
            FD_SWITCH_M4(mt, gemm_bf16_rm(xt, w + (size_t)j * ldw, ldw, K, yt + j, ys, 4, FD_M))
        for (; j < n; j++)
            FD_SWITCH_M4(mt, gemm_bf16_rm(xt, w + (size_t)j * ldw, ldw, K, yt + j, ys, 1, FD_M))
    }
}
#define FD_GEMM_BF16 gemm_bf16_avx512

/* E4M3 bytes -> the bf16 bit patterns of their values, exact (an E4M3 value has at most four
 * significant bits; subnormals become normal bf16; 0x7F/0xFF give NaN), 64 at a time: the high
 * and the low bytes of the 128 magnitudes' patterns sit in two register pairs, vpermt2b
 * (AVX512_VBMI) looks a byte up by the code's low 7 bits (its index ignores bit 7), a
 * ternary-logic op ORs the sign into the high byte, and vpunpcklbw / vpunpckhbw pair low and high
 * bytes into words: 7 instructions per 64 weights (a word-table decode took 8 per 32), in
 * FD_FP8_UNPACK64 order, which the activations are permuted to once per call. Dev VM (Zen 5), one
 * core, rows in cache: 30-33 -> 45-47 GB/s of FP8 weights. */
typedef struct {
    __m512i hi0, hi1, lo0, lo1;
} e4m3_bf16_bytes;

/* The high and low bytes of the bf16 patterns of E4M3 magnitudes 0..127 (fd_e4m3_f32's top
 * halves; 0x7F is NaN): a constant, so a call loads four registers instead of building them. */
static const uint8_t k_e4m3_bf16_hi[128] = {
    0x00, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C,
    0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D,
    0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E,
    0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F,
    0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40,
    0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41,
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42,
    0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x7F,
};
static const uint8_t k_e4m3_bf16_lo[128] = {
    0x00, 0x00, 0x80, 0xC0, 0x00, 0x20, 0x40, 0x60, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xC0,
};

static e4m3_bf16_bytes e4m3_bf16_bytes_load(void) {
    e4m3_bf16_bytes t;
    t.hi0 = _mm512_loadu_si512((const void *)k_e4m3_bf16_hi);
    t.hi1 = _mm512_loadu_si512((const void *)(k_e4m3_bf16_hi + 64));
    t.lo0 = _mm512_loadu_si512((const void *)k_e4m3_bf16_lo);
    t.lo1 = _mm512_loadu_si512((const void *)(k_e4m3_bf16_lo + 64));
    return t;
}

/* first: words of elements 16l + 0..7 of each 16-byte lane l, second: 16l + 8..15. */
FD_INLINE void e4m3_bf16_decode64(const e4m3_bf16_bytes *t, __m512i bytes, __m512i *first,
                                  __m512i *second) {
    __m512i hi = _mm512_permutex2var_epi8(t->hi0, bytes, t->hi1);
    hi = _mm512_ternarylogic_epi32(hi, bytes, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | b&0x80 */
    const __m512i lo = _mm512_permutex2var_epi8(t->lo0, bytes, t->lo1);
    *first = _mm512_unpacklo_epi8(lo, hi);
    *second = _mm512_unpackhi_epi8(lo, hi);
}

/* fp8_dot on bf16 activations in FD_FP8_UNPACK64 order: per 128-wide tile, two vdpbf16ps per 64
 * weights into two tile sums (two dependency chains), then the tile's scale by one FMA into the
 * row's accumulator. A ragged last block reads its bytes masked: zero weights meet the zero
 * padding of the permuted activations. */
FD_INLINE void fp8_dot_bf16_rm(const e4m3_bf16_bytes *tab, const uint8_t *w, size_t ws,
                               const float *tile_scale, int K, const uint16_t *const *x, float *y,
                               size_t ys, const int M) {
    __m512 acc[FD_DOT_MAX_M];
    for (int t = 0; t < M; t++) acc[t] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += 128) {
        const int k1 = k0 + 128 < K ? k0 + 128 : K;
        __m512 part[FD_DOT_MAX_M][2];
        for (int t = 0; t < M; t++) part[t][0] = part[t][1] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k += 64) {
            __m512i bytes, first, second;
            if (k + 64 <= k1) {
                _mm_prefetch((const char *)(w + k + FD_PF_ROWS * ws), _MM_HINT_T0);
                bytes = _mm512_loadu_si512((const void *)(w + k));
            } else {
                bytes = _mm512_maskz_loadu_epi8((__mmask64)((1ull << (k1 - k)) - 1ull), w + k);
            }
            e4m3_bf16_decode64(tab, bytes, &first, &second);
            for (int t = 0; t < M; t++) {
                const __m512i x0 = _mm512_loadu_si512((const void *)(x[t] + k));
                const __m512i x1 = _mm512_loadu_si512((const void *)(x[t] + k + 32));
                part[t][0] = _mm512_dpbf16_ps(part[t][0], (__m512bh)first, (__m512bh)x0);
                part[t][1] = _mm512_dpbf16_ps(part[t][1], (__m512bh)second, (__m512bh)x1);
            }
        }
        const __m512 sc = _mm512_set1_ps(tile_scale[k0 / 128]);
        for (int t = 0; t < M; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_add_ps(part[t][0], part[t][1]), sc, acc[t]);
    }
    for (int t = 0; t < M; t++) y[(size_t)t * ys] = _mm512_reduce_add_ps(acc[t]);
}

static void fp8_dot_bf16_avx512(const uint8_t *w, size_t ws, const float *tile_scale, int rows,
                                int K, const uint16_t *const *x, int m, float *y, size_t ys) {
    const e4m3_bf16_bytes tab = e4m3_bf16_bytes_load();
    for (int r = 0; r < rows; r++) /* one row at a time (see FD_PF_ROWS) */
        FD_SWITCH_M4(m, fp8_dot_bf16_rm(&tab, w + (size_t)r * ws, ws, tile_scale, K, x, y + r,
                                        ys, FD_M))
}
#define FD_FP8_DOT_BF16 fp8_dot_bf16_avx512
#define FD_FP8_BF16_LAYOUT FD_FP8_UNPACK64
#else
#define FD_FP4_DOT_BF16 NULL /* compiler without AVX512_BF16/VBMI: same as the avx512 variant */
#define FD_FP4_BF16_LAYOUT FD_FP4_NATURAL
#define FD_GEMM_BF16 NULL
#define FD_FP8_DOT_BF16 NULL
#define FD_FP8_BF16_LAYOUT FD_FP8_NATURAL
#endif

/* Index scores: one lane per key row, the tile's 32 rows in two registers, eight heads' dot
 * products in flight (sixteen FMA chains), each head's q[h][d] broadcast once per d against row
 * element d of the 32 rows. */
static void index_tile_avx512(const float *q, const float *w, int H, int D, const float *kt,
                              float *out) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 lo = zero, hi = zero;
    int h = 0;
    for (; h + 8 <= H; h += 8) {
        const float *qh = q + (size_t)h * D;
        __m512 a[8][2];
        for (int g = 0; g < 8; g++) a[g][0] = a[g][1] = zero;
        for (int d = 0; d < D; d++) {
            const __m512 k0 = _mm512_load_ps(kt + (size_t)d * FD_INDEX_TILE);
            const __m512 k1 = _mm512_load_ps(kt + (size_t)d * FD_INDEX_TILE + 16);
            for (int g = 0; g < 8; g++) {
                const __m512 b = _mm512_set1_ps(qh[(size_t)g * D + d]);
                a[g][0] = _mm512_fmadd_ps(b, k0, a[g][0]);
                a[g][1] = _mm512_fmadd_ps(b, k1, a[g][1]);
            }
        }
        for (int g = 0; g < 8; g++) {
            const __m512 wg = _mm512_set1_ps(w[h + g]);
            lo = _mm512_fmadd_ps(wg, _mm512_max_ps(a[g][0], zero), lo);
            hi = _mm512_fmadd_ps(wg, _mm512_max_ps(a[g][1], zero), hi);
        }
    }
    for (; h < H; h++) {
        __m512 a0 = zero, a1 = zero;
        for (int d = 0; d < D; d++) {
            const __m512 b = _mm512_set1_ps(q[(size_t)h * D + d]);
            a0 = _mm512_fmadd_ps(b, _mm512_load_ps(kt + (size_t)d * FD_INDEX_TILE), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_load_ps(kt + (size_t)d * FD_INDEX_TILE + 16), a1);
        }
        const __m512 wh = _mm512_set1_ps(w[h]);
        lo = _mm512_fmadd_ps(wh, _mm512_max_ps(a0, zero), lo);
        hi = _mm512_fmadd_ps(wh, _mm512_max_ps(a1, zero), hi);
    }
    _mm512_storeu_ps(out, lo);
    _mm512_storeu_ps(out + 16, hi);
}

/* Two weight rows at a time while the registers allow it (up to two activation rows). */
#define FP4_DOT_Q8_ROWS(VNNI)                                                                      \
    int r = 0;                                                                                     \
    if (m <= 2)                                                                                    \
        for (; r + 2 <= rows; r += 2) {                                                            \
            const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;                      \
            if (m == 1)                                                                            \
                fp4_q8_rm512(wr, ws, sr, ss, K, xq, xd, y + r, ys, 2, 1, VNNI);                    \
            else                                                                                   \
                fp4_q8_rm512(wr, ws, sr, ss, K, xq, xd, y + r, ys, 2, 2, VNNI);                    \
        }                                                                                          \
    for (; r < rows; r++) {                                                                        \
        const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;                          \
        FD_SWITCH_M4(m, fp4_q8_rm512(wr, ws, sr, ss, K, xq, xd, y + r, ys, 1, FD_M, VNNI))         \
    }

static void fp4_dot_q8_avx512(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                              int K, const int8_t *const *xq, const float *const *xd, int m,
                              float *y, size_t ys) {
    FP4_DOT_Q8_ROWS(0)
}

static void fp4_dot_q8_avx512_vnni(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss,
                                   int rows, int K, const int8_t *const *xq,
                                   const float *const *xd, int m, float *y, size_t ys) {
    FP4_DOT_Q8_ROWS(1)
}

const fd_quant_kernels fd_kernels_avx512 = {
    "avx512", FD_FP4_PLANES8, fp4_dot_avx512, fp4_decode_avx512, fp8_dot_avx512,
    fp8_decode_avx512, gemm_f32_avx512, NULL, FD_FP4_NATURAL, bf16_dot_avx512,
    fp8_dot_finite_avx512, NULL, NULL, index_tile_avx512, FD_FP8_NATURAL, fp4_dot_q8_avx512,
    FD_FP4_QUADS4,
};

const fd_quant_kernels fd_kernels_avx512_bf16 = {
    "avx512_bf16", FD_FP4_PLANES8, fp4_dot_avx512, fp4_decode_avx512, fp8_dot_avx512,
    fp8_decode_avx512, gemm_f32_avx512, FD_FP4_DOT_BF16, FD_FP4_BF16_LAYOUT,
    bf16_dot_avx512, fp8_dot_finite_avx512, FD_GEMM_BF16, FD_FP8_DOT_BF16, index_tile_avx512,
    FD_FP8_BF16_LAYOUT, fp4_dot_q8_avx512_vnni, FD_FP4_QUADS4,
};
