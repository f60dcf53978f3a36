/* The routed-expert FFN and the FP8/FP4 linears, built from the per-ISA primitives.
 *
 * Expert FFN (spec §2.7, step 4), for every selected (token t, expert e, weight w) pair:
 *   g = W1_e x_t, u = W3_e x_t (fp32), h = silu(min(g, L)) * clamp(u, -L, L) * w,
 *   y_t += W2_e h     (fp32 accumulation over experts, then added into out once).
 * Weights stay packed (spec §4.4); activations fp32 or bf16; out fp32 or bf16. With bf16
 * activations h is rounded to bf16 before W2, as the reference does (spec §2.7: h -> BF16); fp32
 * activations keep h in fp32 (the fp32 oracle path).
 */
#ifndef FD_EXPERTS_H
#define FD_EXPERTS_H

#include <stddef.h>
#include <stdint.h>

#include "quant_kernels.h"

/* Pointers to one expert's packed tensors: w1/w3 [I, D/2] bytes + [I, D/32] E8M0,
 * w2 [D, I/2] bytes + [D, I/32] E8M0, all C-contiguous. */
typedef struct {
    const uint8_t *w1, *s1, *w3, *s3, *w2, *s2;
} fd_fp4_expert;

/* The variant in use (chosen once from cpu_features, or forced) and lookups by name. */
const fd_quant_kernels *fd_kernels_active(void);
const fd_quant_kernels *fd_kernels_by_name(const char *name); /* NULL: unknown name */
int fd_kernels_supported(const fd_quant_kernels *k);         /* runs on this CPU */
const fd_quant_kernels *fd_kernels_best(void);
void fd_kernels_set_active(const fd_quant_kernels *k);
/* Every variant compiled into this build, best last; returns the count. */
int fd_kernels_compiled(const fd_quant_kernels **out, int max);

/* x: [T, D] (fp32, or bf16 when x_bf16); x_q8: quantize x and h to int8 per 32 elements and
 * run the variant's fp4_dot_q8 (ignored where it has none), ids: [T, k] int32 indices into experts (-1 = none) or
 * NULL (then k == n_experts and pair (t, j) uses expert j), weights: [T, k] fp32,
 * limit: swiglu_limit L (V4: 10; <= 0: no clamp), out: [T, D] fp32 or bf16, accumulated into.
 * Returns 0, or -1 with a message in err. */
int fd_expert_ffn(const fd_quant_kernels *kern, int threads, const void *x, int x_bf16, int x_q8,
                  int T, int D, int I, const fd_fp4_expert *experts, int n_experts, const int32_t *ids,
                  const float *weights, int k, float limit, void *out, int out_bf16, char *err,
                  size_t errlen);

/* FP8_FINITE: FP8 whose caller checked it holds no NaN code (fd_fp8_nan_free). FP4_INT8: FP4
 * with the activations quantized to int8 per 32 elements for the variant's fp4_dot_q8 (plain
 * FP4 where it has none). */
enum {
    FD_WEIGHT_FP4 = 4,
    FD_WEIGHT_FP4_INT8 = 5,
    FD_WEIGHT_FP8 = 8,
    FD_WEIGHT_FP8_FINITE = 9,
    FD_WEIGHT_BF16 = 16
};

/* 1 if none of the n E4M3 bytes is a NaN code (0x7F/0xFF), else 0. */
int fd_fp8_nan_free(const uint8_t *w, size_t n);

/* out[M, N] = x[M, K] . W[N, K]^T (overwritten; fp32 or bf16).
 * FP8: w [N, K] E4M3, scale [ceil(N/128), ceil(K/128)] E8M0.
 * FP4: w [N, K/2] packed E2M1, scale [N, K/32] E8M0 (K a multiple of 32).
 * BF16: w [N, K] bf16 bit patterns (2 bytes each), scale unused.
 * groups > 1: x [M, groups*K], and output rows g*N/groups .. (g+1)*N/groups - 1 see only the g-th
 * K inputs (V4's grouped output projection wo_a); N/groups must be a multiple of 64. */
int fd_quant_linear(const fd_quant_kernels *kern, int threads, int kind, const void *x, int x_bf16,
                    int M, int groups, int K, const uint8_t *w, const uint8_t *scale, int N,
                    void *out, int out_bf16, char *err, size_t errlen);

/* out[n, K] (fp32) = FP8 rows first .. first+n-1 of w [N, K] decoded and scaled by their 128x128
 * tiles' E8M0 scales (scale [ceil(N/128), ceil(K/128)]), rows shared out on the pool: a prompt's
 * FP8 linear can then run as one fp32 GEMM of a BLAS that beats the variant's own. */
int fd_fp8_decode_rows(const fd_quant_kernels *kern, int threads, const uint8_t *w,
                       const uint8_t *scale, int K, int first, int n, float *out, char *err,
                       size_t errlen);

#endif
