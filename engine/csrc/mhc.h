/* Sinkhorn normalisation of hyper-connection mixing matrices (see mhc.c). */
#ifndef FD_MHC_H
#define FD_MHC_H

#include <stdint.h>

#include "quant_kernels.h"

/* a: count matrices [n, n] float32, contiguous, normalised in place. */
void fd_sinkhorn(float *a, long count, int n, int iters, float eps);

/* hc_pre (engine/model/mhc.py): x [S, hc, D] float32 or bf16 -> u [S, D] in x's dtype, post
 * [S, hc] and comb [S, hc, hc] float32. fn [hc (2 + hc), hc D], scale [3], base [hc (2 + hc)]
 * float32; hc <= 16. work: (hc + 1) D + hc (2 + hc) floats of scratch. The mixes' GEMV through the
 * variant's gemm_f32, one thread. Returns 0. */
int fd_hc_pre(const fd_quant_kernels *kern, const void *x, int x_bf16, int S, int hc, int D,
              const float *fn, const float *scale, const float *base, int iters, float hc_eps,
              float norm_eps, void *u, float *post, float *comb, float *work);

/* hc_post: out[s, k] = post[s, k] f[s] + sum_j comb[s, j, k] x[s, j] ([S, hc, D], x's dtype), f
 * [S, D] (float32 or bf16) plus `add` ([S, add_n, D] float32 partial sums, or NULL) rounded to
 * x's dtype first. Float32 math; sums over j in index order. work: 3 D floats of scratch. */
void fd_hc_post(const void *f, int f_bf16, const float *add, int add_n, const void *x, int x_bf16,
                int S, int hc, int D, const float *post, const float *comb, void *out,
                float *work);

#endif
