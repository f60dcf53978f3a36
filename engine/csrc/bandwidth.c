#include "bandwidth.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fd_platform.h"

typedef struct {
    const uint64_t *words;
    size_t nwords;
    uint64_t sink;    /* keeps the reads observable so the compiler cannot drop them */
    int fill;         /* 1: first-touch write pass; 0: timed read pass */
    char pad[64 - 2 * sizeof(void *) - sizeof(uint64_t) - sizeof(int)];
} fd_bw_slice;

/* Eight independent accumulators: enough loads in flight to saturate a DDR channel without SIMD. */
static uint64_t fd_sum_words(const uint64_t *w, size_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += w[i + 0];
        a1 += w[i + 1];
        a2 += w[i + 2];
        a3 += w[i + 3];
        a4 += w[i + 4];
        a5 += w[i + 5];
        a6 += w[i + 6];
        a7 += w[i + 7];
    }
    for (; i < n; i++) a0 += w[i];
    return a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7;
}

static void fd_bw_task(void *p) {
    fd_bw_slice *s = (fd_bw_slice *)p;
    if (s->fill) {
        uint64_t *w = (uint64_t *)s->words;
        for (size_t i = 0; i < s->nwords; i++) w[i] = i * 0x9E3779B97F4A7C15ull;
    } else {
        s->sink += fd_sum_words(s->words, s->nwords);
    }
}

int fd_read_bandwidth(size_t nbytes, int threads, double min_seconds, fd_bandwidth_result *out) {
    memset(out, 0, sizeof *out);
    if (threads < 1) threads = 1;
    size_t nwords = nbytes / sizeof(uint64_t);
    if (nwords < (size_t)threads * 8) nwords = (size_t)threads * 8;
    uint64_t *buf = (uint64_t *)fd_aligned_alloc(nwords * sizeof(uint64_t));
    fd_bw_slice *slices = (fd_bw_slice *)calloc((size_t)threads, sizeof(fd_bw_slice));
    if (!buf || !slices) {
        fd_aligned_free(buf);
        free(slices);
        return -1;
    }
    /* Slices start on 64-byte boundaries (multiples of 8 words). */
    size_t per = (nwords / (size_t)threads) & ~(size_t)7;
    for (int t = 0; t < threads; t++) {
        slices[t].words = buf + (size_t)t * per;
        slices[t].nwords = (t == threads - 1) ? nwords - (size_t)t * per : per;
        slices[t].fill = 1;
    }
    fd_run_parallel(fd_bw_task, slices, sizeof(fd_bw_slice), threads);
    for (int t = 0; t < threads; t++) slices[t].fill = 0;
    fd_run_parallel(fd_bw_task, slices, sizeof(fd_bw_slice), threads); /* warm-up, untimed */

    double bytes = (double)nwords * sizeof(uint64_t);
    double total = 0.0, best = 1e300;
    int passes = 0;
    while (passes < 2 || total < min_seconds) {
        double t0 = fd_now();
        fd_run_parallel(fd_bw_task, slices, sizeof(fd_bw_slice), threads);
        double dt = fd_now() - t0;
        if (dt <= 0) dt = 1e-9;
        total += dt;
        if (dt < best) best = dt;
        passes++;
        if (passes >= 10000) break;
    }
    out->best_gbps = bytes / best / 1e9;
    out->mean_gbps = bytes * passes / total / 1e9;
    out->passes = passes;
    out->seconds = total;
    fd_aligned_free(buf);
    free(slices);
    return 0;
}
