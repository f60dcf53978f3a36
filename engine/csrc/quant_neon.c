/* NEON (AArch64 Advanced SIMD) variant of the quant primitives.
 *
 * FP4: like the AVX2 variant, two table lookups (vqtbl1q) give the high and low byte of each
 * E2M1 value's bf16 pattern and a widening shift (vshll #16) makes fp32 lanes; zips keep element
 * order, so a block decodes to its 16 even then 16 odd elements (FD_FP4_EVEN_ODD). FP8: E4M3 bits
 * moved into an fp16, widened with vcvt, times 2^8; NaN codes patched.
 */
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "fd_platform.h"
#include "quant_kernels.h"

static const uint8_t k_bf16_hi[16] = {0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40,
                                      0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0};
static const uint8_t k_bf16_lo[16] = {0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0,
                                      0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0};

/* 16 nibble codes -> 16 unscaled floats in order (4 vectors). */
FD_INLINE void nibbles_to_f32(uint8x16_t codes, uint8x16_t hi_lut, uint8x16_t lo_lut,
                              float32x4_t v[4]) {
    uint8x16_t hb = vqtbl1q_u8(hi_lut, codes);
    uint8x16_t lb = vqtbl1q_u8(lo_lut, codes);
    uint16x8_t wa = vreinterpretq_u16_u8(vzip1q_u8(lb, hb));
    uint16x8_t wb = vreinterpretq_u16_u8(vzip2q_u8(lb, hb));
    v[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(wa), 16));
    v[1] = vreinterpretq_f32_u32(vshll_high_n_u16(wa, 16));
    v[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(wb), 16));
    v[3] = vreinterpretq_f32_u32(vshll_high_n_u16(wb, 16));
}

/* One 16-byte block -> 32 unscaled floats: ev = even elements, od = odd elements. */
FD_INLINE void fp4_block_decode(const uint8_t *wb, uint8x16_t hi_lut, uint8x16_t lo_lut,
                                float32x4_t ev[4], float32x4_t od[4]) {
    uint8x16_t bytes = vld1q_u8(wb);
    nibbles_to_f32(vandq_u8(bytes, vdupq_n_u8(0x0F)), hi_lut, lo_lut, ev);
    nibbles_to_f32(vshrq_n_u8(bytes, 4), hi_lut, lo_lut, od);
}

FD_INLINE void fp4_dot_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M) {
    const uint8x16_t hi_lut = vld1q_u8(k_bf16_hi), lo_lut = vld1q_u8(k_bf16_lo);
    float32x4_t acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = vdupq_n_f32(0.0f);
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < R; i++) {
            float32x4_t ev[4], od[4];
            fp4_block_decode(w + (size_t)i * ws + (size_t)b * 16, hi_lut, lo_lut, ev, od);
            const float sc = fd_e8m0_f32[s[(size_t)i * ss + b]];
            for (int t = 0; t < M; t++) {
                const float *xb = x[t] + b * 32;
                float32x4_t p = vmulq_f32(ev[0], vld1q_f32(xb));
                float32x4_t q = vmulq_f32(od[0], vld1q_f32(xb + 16));
                for (int j = 1; j < 4; j++) {
                    p = vfmaq_f32(p, ev[j], vld1q_f32(xb + 4 * j));
                    q = vfmaq_f32(q, od[j], vld1q_f32(xb + 16 + 4 * j));
                }
                acc[i][t] = vfmaq_n_f32(acc[i][t], vaddq_f32(p, q), sc);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = vaddvq_f32(acc[i][t]);
}

/* FP4 x int8 (fp4_dot_q8): a block's low and high nibbles looked up (vqtbl1q) as 2 x E2M1, signed
 * int8 in [-12, 12], times the int8 activations in FD_FP4_EVEN_ODD order by widening multiplies
 * (vmull / vmlal_high: 16-bit sums of at most 2 x 12 x 127), pairwise-added into four int32
 * lanes: the block's exact integer sum, converted once and multiplied by its scale. Baseline
 * Advanced SIMD (no DotProd needed). */

FD_INLINE void fp4_q8_rm(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int K,
                         const int8_t *const *xq, const float *const *xd, float *y, size_t ys,
                         const int R, const int M) {
    const int8x16_t lut = vld1q_s8(fd_e2m1_x2);
    float32x4_t acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = vdupq_n_f32(0.0f);
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < R; i++) {
            const uint8x16_t bytes = vld1q_u8(w + (size_t)i * ws + (size_t)b * 16);
            const int8x16_t wl = vqtbl1q_s8(lut, vandq_u8(bytes, vdupq_n_u8(0x0F)));
            const int8x16_t wh = vqtbl1q_s8(lut, vshrq_n_u8(bytes, 4));
            const float sw = fd_e8m0_f32[s[(size_t)i * ss + b]];
            for (int t = 0; t < M; t++) {
                const int8_t *qb = xq[t] + (size_t)b * 32;
                const int8x16_t xl = vld1q_s8(qb), xh = vld1q_s8(qb + 16);
                int16x8_t p = vmull_s8(vget_low_s8(wl), vget_low_s8(xl));
                p = vmlal_high_s8(p, wl, xl);
                int16x8_t q = vmull_s8(vget_low_s8(wh), vget_low_s8(xh));
                q = vmlal_high_s8(q, wh, xh);
                const int32x4_t sum = vpaddlq_s16(vaddq_s16(p, q)); /* |p + q| <= 4 x 1524 */
                acc[i][t] = vfmaq_n_f32(acc[i][t], vcvtq_f32_s32(sum), sw * xd[t][b]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = 0.5f * vaddvq_f32(acc[i][t]);
}

static void fp4_dot_q8_neon(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                            int K, const int8_t *const *xq, const float *const *xd, int m,
                            float *y, size_t ys) {
    int r = 0;
    for (; r + 2 <= rows; r += 2) {
        const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;
        FD_SWITCH_M4(m, fp4_q8_rm(wr, ws, sr, ss, K, xq, xd, y + r, ys, 2, FD_M))
    }
    for (; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws, *sr = s + (size_t)r * ss;
        FD_SWITCH_M4(m, fp4_q8_rm(wr, ws, sr, ss, K, xq, xd, y + r, ys, 1, FD_M))
    }
}

static void fp4_dot_neon(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows, int K,
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

static void fp4_decode_neon(const uint8_t *w, const uint8_t *s, int K, float *dst) {
    const uint8x16_t hi_lut = vld1q_u8(k_bf16_hi), lo_lut = vld1q_u8(k_bf16_lo);
    for (int b = 0; b < K / 32; b++) {
        float32x4_t ev[4], od[4];
        fp4_block_decode(w + b * 16, hi_lut, lo_lut, ev, od);
        const float sc = fd_e8m0_f32[s[b]];
        for (int j = 0; j < 4; j++) {
            vst1q_f32(dst + b * 32 + 4 * j, vmulq_n_f32(ev[j], sc));
            vst1q_f32(dst + b * 32 + 16 + 4 * j, vmulq_n_f32(od[j], sc));
        }
    }
}

/* 8 E4M3 bytes -> 8 exact floats in two vectors. */
FD_INLINE void e4m3_decode8(uint8x8_t bytes, float32x4_t out[2]) {
    uint16x8_t wds = vmovl_u8(bytes);
    uint16x8_t mag = vandq_u16(wds, vdupq_n_u16(0x7F));
    uint16x8_t h = vorrq_u16(vshlq_n_u16(mag, 7), vshlq_n_u16(vandq_u16(wds, vdupq_n_u16(0x80)), 8));
    float16x8_t f = vreinterpretq_f16_u16(h);
    int16x8_t nan16 = vreinterpretq_s16_u16(vceqq_u16(mag, vdupq_n_u16(0x7F)));
    float32x4_t lo = vmulq_n_f32(vcvt_f32_f16(vget_low_f16(f)), 256.0f);
    float32x4_t hi = vmulq_n_f32(vcvt_high_f32_f16(f), 256.0f);
    out[0] = vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(lo),
                                             vreinterpretq_u32_s32(vmovl_s16(vget_low_s16(nan16)))));
    out[1] = vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(hi),
                                             vreinterpretq_u32_s32(vmovl_high_s16(nan16))));
}

FD_INLINE uint8x8_t load_bytes8(const uint8_t *p, int n) {
    if (n == 8) return vld1_u8(p);
    uint8_t buf[8] = {0};
    memcpy(buf, p, (size_t)n);
    return vld1_u8(buf);
}

FD_INLINE void load_floats8(const float *p, int n, float32x4_t out[2]) {
    if (n == 8) {
        out[0] = vld1q_f32(p);
        out[1] = vld1q_f32(p + 4);
        return;
    }
    float buf[8] = {0};
    memcpy(buf, p, sizeof(float) * (size_t)n);
    out[0] = vld1q_f32(buf);
    out[1] = vld1q_f32(buf + 4);
}

FD_INLINE void fp8_dot_rm(const uint8_t *w, size_t ws, const float *tile_scale, int K,
                          const float *const *x, float *y, size_t ys, const int R, const int M) {
    float32x4_t acc[2][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = vdupq_n_f32(0.0f);
    for (int k0 = 0; k0 < K; k0 += 128) {
        const int k1 = k0 + 128 < K ? k0 + 128 : K;
        float32x4_t part[2][FD_DOT_MAX_M];
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++) part[i][t] = vdupq_n_f32(0.0f);
        for (int k = k0; k < k1; k += 8) {
            const int n = k1 - k < 8 ? k1 - k : 8;
            float32x4_t xv[FD_DOT_MAX_M][2];
            for (int t = 0; t < M; t++) load_floats8(x[t] + k, n, xv[t]);
            for (int i = 0; i < R; i++) {
                float32x4_t wv[2];
                e4m3_decode8(load_bytes8(w + (size_t)i * ws + k, n), wv);
                for (int t = 0; t < M; t++) {
                    part[i][t] = vfmaq_f32(part[i][t], wv[0], xv[t][0]);
                    part[i][t] = vfmaq_f32(part[i][t], wv[1], xv[t][1]);
                }
            }
        }
        const float sc = tile_scale[k0 / 128];
        for (int i = 0; i < R; i++)
            for (int t = 0; t < M; t++) acc[i][t] = vfmaq_n_f32(acc[i][t], part[i][t], sc);
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) y[(size_t)t * ys + i] = vaddvq_f32(acc[i][t]);
}

static void fp8_dot_neon(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                         const float *const *x, int m, float *y, size_t ys) {
    int r = 0;
    for (; r + 2 <= rows; r += 2) {
        const uint8_t *wr = w + (size_t)r * ws;
        FD_SWITCH_M4(m, fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 2, FD_M))
    }
    for (; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        FD_SWITCH_M4(m, fp8_dot_rm(wr, ws, tile_scale, K, x, y + r, ys, 1, FD_M))
    }
}

static void fp8_decode_neon(const uint8_t *w, const float *tile_scale, int K, float *dst) {
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        float32x4_t v[2];
        e4m3_decode8(vld1_u8(w + k), v);
        const float sc = tile_scale[k / 128];
        vst1q_f32(dst + k, vmulq_n_f32(v[0], sc));
        vst1q_f32(dst + k + 4, vmulq_n_f32(v[1], sc));
    }
    for (; k < K; k++) dst[k] = fd_e4m3_f32[w[k]] * tile_scale[k / 128];
}

/* bf16 weights: 4 widened to fp32 per step (shift into the high half: exact); the ragged end of
 * a row in scalar code. */
FD_INLINE void bf16_dot_rm(const uint16_t *w, size_t ws, int K, const float *const *x, float *y,
                           size_t ys, const int R, const int M) {
    float32x4_t acc[4][FD_DOT_MAX_M];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) acc[i][t] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t xv[FD_DOT_MAX_M];
        for (int t = 0; t < M; t++) xv[t] = vld1q_f32(x[t] + k);
        for (int i = 0; i < R; i++) {
            const float32x4_t wv =
                vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + (size_t)i * ws + k), 16));
            for (int t = 0; t < M; t++) acc[i][t] = vfmaq_f32(acc[i][t], wv, xv[t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < M; t++) {
            float v = vaddvq_f32(acc[i][t]);
            for (int kk = k; kk < K; kk++) v += fd_bf16_f32(w[(size_t)i * ws + kk]) * x[t][kk];
            y[(size_t)t * ys + i] = v;
        }
}

static void bf16_dot_neon(const uint16_t *w, size_t ws, int rows, int K, const float *const *x,
                          int m, float *y, size_t ys) {
    for (int r = 0; r < rows; r += (rows - r >= 4 ? 4 : 1)) {
        const uint16_t *wr = w + (size_t)r * ws;
        if (rows - r >= 4) {
            FD_SWITCH_M4(m, bf16_dot_rm(wr, ws, K, x, y + r, ys, 4, FD_M))
        } else {
            FD_SWITCH_M4(m, bf16_dot_rm(wr, ws, K, x, y + r, ys, 1, FD_M))
        }
    }
}

FD_INLINE void gemm_rm(const float *const *x, const float *w, size_t ldw, int K, float *y,
                       size_t ys, const int N, const int M) {
    float32x4_t acc[4][4];
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) acc[j][t] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t xv[4];
        for (int t = 0; t < M; t++) xv[t] = vld1q_f32(x[t] + k);
        for (int j = 0; j < N; j++) {
            float32x4_t wv = vld1q_f32(w + (size_t)j * ldw + k);
            for (int t = 0; t < M; t++) acc[j][t] = vfmaq_f32(acc[j][t], xv[t], wv);
        }
    }
    for (int j = 0; j < N; j++)
        for (int t = 0; t < M; t++) {
            float v = vaddvq_f32(acc[j][t]);
            for (int kk = k; kk < K; kk++) v += x[t][kk] * w[(size_t)j * ldw + kk];
            y[(size_t)t * ys + j] = v;
        }
}

static void gemm_f32_neon(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                          float *y, size_t ys) {
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

/* Index scores: the tile's 32 rows in eight registers, two heads' dot products in flight
 * (sixteen FMA chains), each head's q[h][d] taken once per d against row element d of the rows. */
static void index_tile_neon(const float *q, const float *w, int H, int D, const float *kt,
                            float *out) {
    const float32x4_t zero = vdupq_n_f32(0.0f);
    float32x4_t total[8];
    for (int v = 0; v < 8; v++) total[v] = zero;
    int h = 0;
    for (; h + 2 <= H; h += 2) {
        const float *qh = q + (size_t)h * D;
        float32x4_t a[2][8];
        for (int g = 0; g < 2; g++)
            for (int v = 0; v < 8; v++) a[g][v] = zero;
        for (int d = 0; d < D; d++) {
            float32x4_t k[8];
            for (int v = 0; v < 8; v++) k[v] = vld1q_f32(kt + (size_t)d * FD_INDEX_TILE + 4 * v);
            for (int g = 0; g < 2; g++) {
                const float b = qh[(size_t)g * D + d];
                for (int v = 0; v < 8; v++) a[g][v] = vfmaq_n_f32(a[g][v], k[v], b);
            }
        }
        for (int g = 0; g < 2; g++)
            for (int v = 0; v < 8; v++)
                total[v] = vfmaq_n_f32(total[v], vmaxq_f32(a[g][v], zero), w[h + g]);
    }
    for (; h < H; h++) {
        float32x4_t a[8];
        for (int v = 0; v < 8; v++) a[v] = zero;
        for (int d = 0; d < D; d++)
            for (int v = 0; v < 8; v++)
                a[v] = vfmaq_n_f32(a[v], vld1q_f32(kt + (size_t)d * FD_INDEX_TILE + 4 * v),
                                   q[(size_t)h * D + d]);
        for (int v = 0; v < 8; v++) total[v] = vfmaq_n_f32(total[v], vmaxq_f32(a[v], zero), w[h]);
    }
    for (int v = 0; v < 8; v++) vst1q_f32(out + 4 * v, total[v]);
}

const fd_quant_kernels fd_kernels_neon = {
    "neon", FD_FP4_EVEN_ODD, fp4_dot_neon, fp4_decode_neon, fp8_dot_neon, fp8_decode_neon, gemm_f32_neon, NULL, FD_FP4_NATURAL,
    bf16_dot_neon, NULL, NULL, NULL, index_tile_neon, FD_FP8_NATURAL, fp4_dot_q8_neon,
    FD_FP4_EVEN_ODD,
};
