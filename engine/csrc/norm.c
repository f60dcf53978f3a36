/* RMSNorm of a few CPU rows in one call (engine/model/common.py `rms_norm`): as torch ops each
 * call was six to eight operations (widen, square, mean, add, rsqrt, two multiplies, cast), and a
 * decode layer makes about eight such calls. Float32 math as the ops: y = x * (1 / sqrt(mean(x^2)
 * + eps)) * w, the result in the input's dtype. */
#include "norm.h"

#include <math.h>
#include <string.h>

/* Sum of squares in 16 float32 partial sums (they vectorize; the ops' float32 tree sum
 * differs from them by float32 rounding only). */
static float sum_squares(const float *v, int n) {
    float part[16] = {0};
    int k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) part[j] += v[k + j] * v[k + j];
    float total = 0.0f;
    for (int j = 0; j < 16; j++) total += part[j];
    for (; k < n; k++) total += v[k] * v[k];
    return total;
}

void fd_rms_norm(const void *x, int bf16, long rows, int n, const float *weight, float eps,
                 void *out, float *work) {
    for (long r = 0; r < rows; r++) {
        const size_t at = (size_t)r * n;
        const float *v = (const float *)x + at;
        if (bf16) { /* widened once into the scratch row */
            for (int k = 0; k < n; k++) work[k] = fd_bf16_f32(((const uint16_t *)x)[at + k]);
            v = work;
        }
        const float scale = 1.0f / sqrtf(sum_squares(v, n) / (float)n + eps);
        float *y = bf16 ? work : (float *)out + at;
        if (weight)
            for (int k = 0; k < n; k++) y[k] = v[k] * scale * weight[k];
        else
            for (int k = 0; k < n; k++) y[k] = v[k] * scale;
        if (bf16)
            for (int k = 0; k < n; k++) ((uint16_t *)out)[at + k] = fd_f32_bf16(y[k]);
    }
}
