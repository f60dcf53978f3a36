/* Rotary embedding of a few CPU tokens in one call (engine/model/rope.py `apply_rope`).
 *
 * As torch ops a call was about ten operations (slice, widen, unflatten, four multiplies, two
 * adds, stack, cat, casts), ~60 µs on the dev VM for a 64-head query; the work itself is a few
 * thousand multiply-adds. Same arithmetic as the ops: each value taken as the output dtype
 * first (x.to(out_dtype)), the pair (a, b) rotated as (a cos - b sin, a sin + b cos) in float32
 * with separately rounded products (the build does not contract them into FMAs), the result
 * rounded to the output dtype.
 */
#include "rope.h"

#include <string.h>

/* Element k of a row as the output dtype would hold it (x.to(out_dtype)), in float32. */
static float load(const void *x, int x_bf16, int out_bf16, size_t at) {
    if (x_bf16) return fd_bf16_f32(((const uint16_t *)x)[at]);
    const float v = ((const float *)x)[at];
    return out_bf16 ? fd_bf16_f32(fd_f32_bf16(v)) : v;
}

void fd_rope(const void *x, int x_bf16, int S, int H, int d, int rope_dim, const float *cos,
             const float *sin, int inverse, void *out, int out_bf16) {
    const int half = rope_dim / 2, plain = d - rope_dim;
    for (int s = 0; s < S; s++) {
        const float *cs = cos + (size_t)s * half, *sn = sin + (size_t)s * half;
        for (int h = 0; h < H; h++) {
            const size_t row = ((size_t)s * H + h) * d;
            /* the channels without rope: copied, or converted */
            if (x_bf16 == out_bf16) {
                const size_t width = x_bf16 ? 2 : 4;
                memcpy((char *)out + row * width, (const char *)x + row * width,
                       width * (size_t)plain);
            } else if (out_bf16) {
                for (int k = 0; k < plain; k++)
                    ((uint16_t *)out)[row + k] = fd_f32_bf16(((const float *)x)[row + k]);
            } else {
                for (int k = 0; k < plain; k++)
                    ((float *)out)[row + k] = fd_bf16_f32(((const uint16_t *)x)[row + k]);
            }
            for (int i = 0; i < half; i++) { /* the rope pairs */
                const size_t at = row + (size_t)plain + 2 * (size_t)i;
                const float a = load(x, x_bf16, out_bf16, at), b = load(x, x_bf16, out_bf16, at + 1);
                const float c = cs[i], sv = inverse ? -sn[i] : sn[i];
                const float p = a * c, q = b * sv, r = a * sv, t = b * c;
                const float y0 = p - q, y1 = r + t;
                if (out_bf16) {
                    ((uint16_t *)out)[at] = fd_f32_bf16(y0);
                    ((uint16_t *)out)[at + 1] = fd_f32_bf16(y1);
                } else {
                    ((float *)out)[at] = y0;
                    ((float *)out)[at + 1] = y1;
                }
            }
        }
    }
}
