/* A decode token's sink attention on the CPU (spec §2.6), over rows as stored.
 *
 * out[h] = sum_t p[h, t] * row_t with p[h] = softmax over (scale * q[h] . row_t for every row of
 * every set, and the head's sink logit), the sink taking its share of the denominator only (K = V:
 * one row is both). As torch ops an HCA layer widened its context/128 entries to a float32 copy
 * each token and ran einsums over it on torch's threads, which contend with the kernels' pool;
 * here rows are widened tile by tile and both products run on the variant's gemm_f32.
 */
#ifndef FD_ATTENTION_H
#define FD_ATTENTION_H
#include <stddef.h>
#include <stdint.h>

#include "quant_kernels.h"

enum { FD_ROWS_F32 = 0, FD_ROWS_BF16 = 1, FD_ROWS_FP8 = 2 };

/* One set of candidate rows: count rows of D elements, row t at rows + t * stride elements
 * (fp32 or bf16), or for FD_ROWS_FP8 the packed KV layout of spec §3.2: the first nope elements
 * as E4M3 codes (rows + t * stride bytes) times one E8M0 exponent per 64 (exps + t * nope/64),
 * the other D - nope as bf16 (rope + t * (D - nope)). */
typedef struct {
    const void *rows;
    int kind;
    size_t stride;
    long count;
    const uint8_t *exps;
    const uint16_t *rope;
    int nope;
} fd_row_set;

/* q [H, D] fp32, sink [H] fp32, sets[0..n_sets) the candidates (at least one row in all) →
 * out [H, D] fp32 (overwritten). Returns 0, or -1 with a message in err. */
int fd_sink_attention(const fd_quant_kernels *kern, int threads, const float *q, float scale,
                      const float *sink, int H, int D, const fd_row_set *sets, int n_sets,
                      float *out, char *err, size_t errlen);
#endif
