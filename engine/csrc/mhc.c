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

static void normalise_rows(float *a, int n, float eps) {
    for (int i = 0; i < n; i++) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += a[i * n + j];
        s += eps;
        for (int j = 0; j < n; j++) a[i * n + j] /= s;
    }
}

static void normalise_cols(float *a, int n, float eps) {
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s += a[i * n + j];
        s += eps;
        for (int i = 0; i < n; i++) a[i * n + j] /= s;
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
        normalise_cols(x, n, eps);
        for (int it = 1; it < iters; it++) {
            normalise_rows(x, n, eps);
            normalise_cols(x, n, eps);
        }
    }
}
