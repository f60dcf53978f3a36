/* The portable scalar reference of every quant primitive, and the exact decode tables.
 *
 * Every SIMD variant is tested against these loops; they use the same accumulation structure
 * (per-block partial sums times the block scale, fp32) so variants differ only in summation order.
 */
#include <math.h>
#include <string.h>

#include "quant_kernels.h"

float fd_e2m1_f32[16];
float fd_e8m0_f32[256];
float fd_e4m3_f32[256];

void fd_quant_tables_init(void) {
    static int done = 0; /* the first call runs at import, under the import lock */
    if (done) return;
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 16; c++) fd_e2m1_f32[c] = (c & 8) ? -mag[c & 7] : mag[c & 7];
    for (int b = 0; b < 256; b++) fd_e8m0_f32[b] = b == 255 ? NAN : ldexpf(1.0f, b - 127);
#if defined(FD_HAVE_X86_VARIANTS)
    fd_kernels_avx2_vnni_init();
#endif
    for (int b = 0; b < 256; b++) {
        int e = (b >> 3) & 15, m = b & 7;
        float v;
        if ((b & 0x7F) == 0x7F)
            v = NAN;
        else if (e == 0)
            v = ldexpf((float)m, -9); /* subnormal: m/8 * 2^-6 */
        else
            v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
        fd_e4m3_f32[b] = (b & 0x80) ? -v : v;
    }
    done = 1;
}

void fd_fp4_permute_row(int layout, const float *src, float *dst, int K) {
    for (int k = 0; k < K; k++) dst[fd_fp4_perm_index(layout, k, K)] = src[k];
}

void fd_fp4_permute_row_bf16(int layout, const uint16_t *src, uint16_t *dst, int K) {
    for (int k = 0; k < K; k++) dst[fd_fp4_perm_index(layout, k, K)] = src[k];
}

void fd_fp8_permute_row_bf16(int layout, const uint16_t *src, uint16_t *dst, int K) {
    const int whole = layout == FD_FP8_UNPACK64 ? K & ~(FD_FP8_BLOCK - 1) : K;
    if (layout == FD_FP8_UNPACK64) /* whole blocks: eight runs of 8 words each */
        for (int b = 0; b < whole; b += FD_FP8_BLOCK)
            for (int r = 0; r < FD_FP8_BLOCK; r += 8)
                memcpy(dst + fd_fp8_perm_index(layout, b + r), src + b + r, 8 * sizeof *src);
    else
        memcpy(dst, src, (size_t)K * sizeof *src);
    const size_t n = fd_fp8_row_words(layout, K);
    for (size_t k = (size_t)whole; k < n; k++) dst[k] = 0; /* the last, partial block */
    for (int k = whole; k < K; k++) dst[fd_fp8_perm_index(layout, k)] = src[k];
}

/* Round to nearest even for |v| < 2^22: adding 1.5 * 2^23 leaves the integer in the low mantissa
 * bits (no libm call, so the quantizer's loops vectorize). */
static inline int32_t round_even(float v) {
    float r = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &r, sizeof i);
    return i - 0x4B400000;
}

void fd_q8_quantize(const float *x, int n, const int *pos, int8_t *q, float *d, float *sum) {
    for (int b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        int finite = 1;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            finite &= a <= 3.4028235e38f; /* false for Inf and NaN */
            amax = a > amax ? a : amax;
        }
        const float step = !finite ? NAN : amax / 127.0f;
        const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = step;
        int32_t total = 0;
        for (int j = 0; j < 32; j++) {
            int32_t v = finite ? round_even(xb[j] * inv) : 0;
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            q[pos ? pos[32 * b + j] : 32 * b + j] = (int8_t)v;
            total += v;
        }
        sum[b] = (float)total;
    }
}

static void fp4_dot_scalar(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                           int K, const float *const *x, int m, float *y, size_t ys) {
    const int nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        const uint8_t *sr = s + (size_t)r * ss;
        for (int t = 0; t < m; t++) {
            const float *xt = x[t];
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                float part = 0.0f;
                for (int j = 0; j < 16; j++) {
                    uint8_t byte = wr[b * 16 + j];
                    part += fd_e2m1_f32[byte & 15] * xt[b * 32 + 2 * j];
                    part += fd_e2m1_f32[byte >> 4] * xt[b * 32 + 2 * j + 1];
                }
                acc += part * fd_e8m0_f32[sr[b]];
            }
            y[(size_t)t * ys + r] = acc;
        }
    }
}

const int8_t fd_e2m1_x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static void fp4_dot_q8_scalar(const uint8_t *w, size_t ws, const uint8_t *s, size_t ss, int rows,
                              int K, const int8_t *const *xq, const float *const *xd, int m,
                              float *y, size_t ys) {
    const int nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        const uint8_t *sr = s + (size_t)r * ss;
        for (int t = 0; t < m; t++) {
            const int8_t *qt = xq[t];
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                int32_t part = 0;
                for (int j = 0; j < 16; j++) {
                    const uint8_t byte = wr[b * 16 + j];
                    part += fd_e2m1_x2[byte & 15] * qt[b * 32 + 2 * j];
                    part += fd_e2m1_x2[byte >> 4] * qt[b * 32 + 2 * j + 1];
                }
                acc += (float)part * (fd_e8m0_f32[sr[b]] * xd[t][b]);
            }
            y[(size_t)t * ys + r] = 0.5f * acc;
        }
    }
}

static void fp4_decode_scalar(const uint8_t *w, const uint8_t *s, int K, float *dst) {
    for (int b = 0; b < K / 32; b++) {
        float scale = fd_e8m0_f32[s[b]];
        for (int j = 0; j < 16; j++) {
            uint8_t byte = w[b * 16 + j];
            dst[b * 32 + 2 * j] = fd_e2m1_f32[byte & 15] * scale;
            dst[b * 32 + 2 * j + 1] = fd_e2m1_f32[byte >> 4] * scale;
        }
    }
}

static void fp8_dot_scalar(const uint8_t *w, size_t ws, const float *tile_scale, int rows, int K,
                           const float *const *x, int m, float *y, size_t ys) {
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (size_t)r * ws;
        for (int t = 0; t < m; t++) {
            const float *xt = x[t];
            float acc = 0.0f;
            for (int k0 = 0; k0 < K; k0 += 128) {
                int k1 = k0 + 128 < K ? k0 + 128 : K;
                float part = 0.0f;
                for (int k = k0; k < k1; k++) part += fd_e4m3_f32[wr[k]] * xt[k];
                acc += part * tile_scale[k0 / 128];
            }
            y[(size_t)t * ys + r] = acc;
        }
    }
}

static void fp8_decode_scalar(const uint8_t *w, const float *tile_scale, int K, float *dst) {
    for (int k = 0; k < K; k++) dst[k] = fd_e4m3_f32[w[k]] * tile_scale[k / 128];
}

static void bf16_dot_scalar(const uint16_t *w, size_t ws, int rows, int K, const float *const *x,
                            int m, float *y, size_t ys) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *wr = w + (size_t)r * ws;
        for (int t = 0; t < m; t++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += fd_bf16_f32(wr[k]) * x[t][k];
            y[(size_t)t * ys + r] = acc;
        }
    }
}

static void gemm_f32_scalar(const float *const *x, int m, const float *w, size_t ldw, int n, int K,
                            float *y, size_t ys) {
    for (int t = 0; t < m; t++)
        for (int j = 0; j < n; j++) {
            const float *wj = w + (size_t)j * ldw;
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[t][k] * wj[k];
            y[(size_t)t * ys + j] = acc;
        }
}

static void index_tile_scalar(const float *q, const float *w, int H, int D, const float *kt,
                              float *out) {
    for (int j = 0; j < FD_INDEX_TILE; j++) {
        float total = 0.0f;
        for (int h = 0; h < H; h++) {
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += q[(size_t)h * D + d] * kt[(size_t)d * FD_INDEX_TILE + j];
            total += w[h] * (dot > 0.0f ? dot : 0.0f);
        }
        out[j] = total;
    }
}

const fd_quant_kernels fd_kernels_scalar = {
    "scalar", FD_FP4_NATURAL, fp4_dot_scalar, fp4_decode_scalar, fp8_dot_scalar, fp8_decode_scalar, gemm_f32_scalar, NULL, FD_FP4_NATURAL,
    bf16_dot_scalar, NULL, NULL, NULL, index_tile_scalar, FD_FP8_NATURAL, fp4_dot_q8_scalar,
    FD_FP4_NATURAL,
};
