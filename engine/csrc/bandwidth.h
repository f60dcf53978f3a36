/* Measured memory read bandwidth: the number every FlashDesk speed figure is a ratio against. */
#ifndef FD_BANDWIDTH_H
#define FD_BANDWIDTH_H

#include <stddef.h>

typedef struct {
    double best_gbps;   /* fastest full pass over the buffer, 1e9 bytes per second */
    double mean_gbps;   /* mean over the timed passes */
    int passes;         /* timed passes (after one untimed warm-up pass) */
    double seconds;     /* wall time spent in timed passes */
} fd_bandwidth_result;

/* Reads an nbytes buffer with `threads` threads, each streaming its own contiguous slice, for at
 * least min_seconds (and at least 2 passes). The buffer is first written by the same threads so
 * that its pages live on the reading threads' NUMA nodes. Returns 0, or -1 when out of memory. */
int fd_read_bandwidth(size_t nbytes, int threads, double min_seconds, fd_bandwidth_result *out);

#endif
