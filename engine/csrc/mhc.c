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

/* Divide each of the n lines of the n x n matrix a by its sum plus eps: rows when
 * (line, step) = (n, 1), columns when (1, n). */
static void normalise(float *a, int n, int line, int step, float eps) {
    for (int i = 0; i < n; i++) {
        float *v = a + i * line, s = 0.0f;
        for (int j = 0; j < n; j++) s += v[j * step];
        s += eps;
        for (int j = 0; j < n; j++) v[j * step] /= s;
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
        normalise(x, n, 1, n, eps); /* columns */
        for (int it = 1; it < iters; it++) {
            normalise(x, n, n, 1, eps); /* rows */
            normalise(x, n, 1, n, eps);
        }
    }
}
