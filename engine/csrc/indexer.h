/* The lightning indexer's scores on the CPU (spec §2.6.2), straight from the stored keys.
 *
 * score[s, t] = sum_h w[s, h] * ReLU(q[s, h] . key_t): at 1M tokens of context a CSA layer holds
 * 262,144 index keys, and as torch ops every decode token widened all of them to a float32 copy
 * (134 MB) and ran two einsums over it (~200 ms per layer and token on the dev VM). Here each
 * 32-key tile is widened once into L1, transposed, and scored for every query against it by the
 * variant's `index_tile` (fp32 FMAs, one key per SIMD lane), on the kernels' thread pool.
 */
#ifndef FD_INDEXER_H
#define FD_INDEXER_H
#include <stddef.h>
#include <stdint.h>

#include "quant_kernels.h"

/* How keys are stored: fp32 or bf16 rows, or E4M3 codes times one fp32 scale per key. */
enum { FD_KEYS_F32 = 0, FD_KEYS_BF16 = 1, FD_KEYS_E4M3 = 2 };

/* q [S, H, D] fp32, w [S, H] fp32 (head weights, scale included), keys: T rows of D elements,
 * row t at keys + t * key_stride elements; row_scale [T] fp32 for E4M3 (else NULL);
 * out [S, T] fp32 at out + s * out_stride. Returns 0, or -1 with a message in err. */
int fd_index_scores(const fd_quant_kernels *kern, int threads, const float *q, const float *w,
                    int S, int H, int D, int kind, const void *keys, size_t key_stride,
                    const float *row_scale, long T, float *out, size_t out_stride, char *err,
                    size_t errlen);
#endif
