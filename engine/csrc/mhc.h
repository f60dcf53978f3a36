/* Sinkhorn normalisation of hyper-connection mixing matrices (see mhc.c). */
#ifndef FD_MHC_H
#define FD_MHC_H

/* a: count matrices [n, n] float32, contiguous, normalised in place. */
void fd_sinkhorn(float *a, long count, int n, int iters, float eps);

#endif
