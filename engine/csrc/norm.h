/* RMSNorm on the CPU (see norm.c). */
#ifndef FD_NORM_H
#define FD_NORM_H

#include <stdint.h>

#include "quant_kernels.h"

/* rows x n values (float32, or bf16 when bf16) normalised over each row, times weight [n]
 * float32 (or NULL), into out (same dtype and shape; may alias x). work: n floats of scratch. */
void fd_rms_norm(const void *x, int bf16, long rows, int n, const float *weight, float eps,
                 void *out, float *work);

#endif
