/* Rotary embedding on the CPU (see rope.c). */
#ifndef FD_ROPE_H
#define FD_ROPE_H

#include <stdint.h>

#include "quant_kernels.h"

/* x [S, H, d] float32 or bf16 (H = 1 for [S, d]); the last rope_dim (even) channels rotated in
 * consecutive pairs by cos/sin [S, rope_dim / 2] float32 (the negative angle when inverse), the
 * rest copied; out [S, H, d] float32 or bf16 (may not alias x). */
void fd_rope(const void *x, int x_bf16, int S, int H, int d, int rope_dim, const float *cos,
             const float *sin, int inverse, void *out, int out_bf16);

#endif
