/* Sinkhorn normalisation of the hyper-connection mixing matrices (spec §2.3), for the CPU.
 *
 * Per token it is ~120 tiny tensor operations on a 4x4 matrix; as torch ops each costs its
 * dispatch (µs), which makes it about 40% of all operations a decode step dispatches. Here it is
 * one call for all S matrices, with the reference's order of operations: row softmax + eps, one
 * column normalisation, then (iters - 1) row and column normalisations, each dividing by its sum
 * plus eps. Float32 throughout; sums in index order.
 */
#include "mhc.h"

#include <math.h>
#include <string.h>

/* Divide each of the n lines of the n x n matrix a by its sum plus eps: rows when
 * (line, step) = (n, 1), columns when (1, n). */
static void normalise(float *a, int n, int line, int step, float eps) {
    for (int i = 0; i < n; i++) {
        float *v = a + i * line, s = 0.0f;
        for (int j = 0; j < n; j++) s += v[j * step];
        s += eps;
        for (int j = 0; j < n; j++) v[j * step] /= s;
    }
}

void fd_sinkhorn(float *a, long count, int n, int iters, float eps) {
    for (long m = 0; m < count; m++) {
        float *x = a + m * (long)n * n;
        for (int i = 0; i < n; i++) {
            float *row = x + i * n, mx = row[0], s = 0.0f;
            for (int j = 1; j < n; j++) mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j < n; j++) {
                row[j] = expf(row[j] - mx);
                s += row[j];
            }
            for (int j = 0; j < n; j++) row[j] = row[j] / s + eps;
        }
        normalise(x, n, 1, n, eps); /* columns */
        for (int it = 1; it < iters; it++) {
            normalise(x, n, n, 1, eps); /* rows */
            normalise(x, n, 1, n, eps);
        }
    }
}

/* ---- The whole CPU hyper-connection pre and post steps (spec §2.3) for a few tokens: as torch
 * ops each was ~15 small operations (split, sigmoids, scale and bias, the Sinkhorn call, the
 * weighted collapse, dtype casts), each paying its dispatch; the mixes' GEMV is the only part
 * that reads much memory. */

static float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

int fd_hc_pre(const fd_quant_kernels *kern, const void *x, int x_bf16, int S, int hc, int D,
              const float *fn, const float *scale, const float *base, int iters, float hc_eps,
              float norm_eps, void *u, float *post, float *comb, float *work) {
    const int n_mix = hc * (2 + hc), width = hc * D;
    float *mixes = work + width;
    for (int s = 0; s < S; s++) {
        const float *flat = (const float *)x + (size_t)s * width;
        if (x_bf16) {
            const uint16_t *src = (const uint16_t *)x + (size_t)s * width;
            for (int k = 0; k < width; k++) work[k] = fd_bf16_f32(src[k]);
            flat = work;
        }
        double sq = 0.0;
        for (int k = 0; k < width; k++) sq += (double)flat[k] * flat[k];
        const float rho = 1.0f / sqrtf((float)(sq / width) + norm_eps);
        kern->gemm_f32(&flat, 1, fn, (size_t)width, n_mix, width, mixes, (size_t)n_mix);
        float pre[16];
        float *ps = post + (size_t)s * hc, *cs = comb + (size_t)s * hc * hc;
        for (int j = 0; j < hc; j++) {
            pre[j] = sigmoid(mixes[j] * rho * scale[0] + base[j]) + hc_eps;
            ps[j] = 2.0f * sigmoid(mixes[hc + j] * rho * scale[1] + base[hc + j]);
        }
        for (int j = 0; j < hc * hc; j++)
            cs[j] = mixes[2 * hc + j] * rho * scale[2] + base[2 * hc + j];
        fd_sinkhorn(cs, 1, hc, iters, hc_eps);
        float *acc = mixes + n_mix; /* [D]: the collapse, stream by stream (vectorizes) */
        for (int d = 0; d < D; d++) acc[d] = pre[0] * flat[d];
        for (int j = 1; j < hc; j++)
            for (int d = 0; d < D; d++) acc[d] += pre[j] * flat[(size_t)j * D + d];
        if (x_bf16)
            for (int d = 0; d < D; d++) ((uint16_t *)u)[(size_t)s * D + d] = fd_f32_bf16(acc[d]);
        else
            memcpy((float *)u + (size_t)s * D, acc, sizeof(float) * (size_t)D);
    }
    return 0;
}

void fd_hc_post(const void *f, int f_bf16, const float *add, int add_n, const void *x, int x_bf16,
                int S, int hc, int D, const float *post, const float *comb, void *out,
                float *work) {
    float *fr = work, *acc = work + D, *xr = work + 2 * (size_t)D; /* [D] each */
    for (int s = 0; s < S; s++) {
        for (int d = 0; d < D; d++) { /* f, plus the partial sums, as rounded to x's dtype */
            const size_t at = (size_t)s * D + d;
            fr[d] = f_bf16 ? fd_bf16_f32(((const uint16_t *)f)[at]) : ((const float *)f)[at];
        }
        for (int a = 0; a < add_n; a++)
            for (int d = 0; d < D; d++) fr[d] += add[((size_t)s * add_n + a) * D + d];
        if (x_bf16)
            for (int d = 0; d < D; d++) fr[d] = fd_bf16_f32(fd_f32_bf16(fr[d]));
        if (hc == 4 && !x_bf16) { /* V4's streams as float32: one pass over the four */
            const float *x0 = (const float *)x + (size_t)s * 4 * D, *x1 = x0 + D, *x2 = x1 + D,
                        *x3 = x2 + D;
            const float *c = comb + (size_t)s * 16, *p = post + (size_t)s * 4;
            float *o0 = (float *)out + (size_t)s * 4 * D, *o1 = o0 + D, *o2 = o1 + D, *o3 = o2 + D;
            for (int d = 0; d < D; d++) {
                const float fv = fr[d], a0 = x0[d], a1 = x1[d], a2 = x2[d], a3 = x3[d];
                o0[d] = p[0] * fv + c[0] * a0 + c[4] * a1 + c[8] * a2 + c[12] * a3;
                o1[d] = p[1] * fv + c[1] * a0 + c[5] * a1 + c[9] * a2 + c[13] * a3;
                o2[d] = p[2] * fv + c[2] * a0 + c[6] * a1 + c[10] * a2 + c[14] * a3;
                o3[d] = p[3] * fv + c[3] * a0 + c[7] * a1 + c[11] * a2 + c[15] * a3;
            }
            continue;
        }
        for (int k = 0; k < hc; k++) {
            const float pk = post[(size_t)s * hc + k];
            for (int d = 0; d < D; d++) acc[d] = pk * fr[d];
            for (int j = 0; j < hc; j++) {
                const float c = comb[((size_t)s * hc + j) * hc + k];
                const size_t xi = ((size_t)s * hc + j) * D;
                const float *xj = (const float *)x + xi;
                if (x_bf16) {
                    for (int d = 0; d < D; d++) xr[d] = fd_bf16_f32(((const uint16_t *)x)[xi + d]);
                    xj = xr;
                }
                for (int d = 0; d < D; d++) acc[d] += c * xj[d];
            }
            const size_t oi = ((size_t)s * hc + k) * D;
            if (x_bf16)
                for (int d = 0; d < D; d++) ((uint16_t *)out)[oi + d] = fd_f32_bf16(acc[d]);
            else
                memcpy((float *)out + oi, acc, sizeof(float) * (size_t)D);
        }
    }
}
