/* Lightning-indexer scores on the thread pool (see indexer.h).
 *
 * Units of FD_INDEX_UNIT keys are handed out through an atomic counter; a thread widens each
 * 32-key tile of its unit once (fp32, transposed, in its own aligned scratch) and scores every
 * query against it, so the keys are read from memory once per call whatever the query count.
 * Each score is computed by one lane in a fixed order, so the result does not depend on the
 * thread count or on how many keys the call covers.
 */
#include "indexer.h"

#include <stdio.h>
#include <string.h>

#include "fd_platform.h"

#define FD_INDEX_UNIT 256 /* keys per work unit (8 tiles) */

typedef struct {
    const fd_quant_kernels *kern;
    const float *q, *w, *row_scale;
    const void *keys;
    size_t key_stride, out_stride;
    int S, H, D, kind;
    long T, units;
    float *out;
    fd_atomic_int next;
    fd_atomic_int failed;
} index_ctx;

/* Keys t0 .. t0+n-1 (n <= FD_INDEX_TILE) widened into kt [D][FD_INDEX_TILE]; lanes past n zero. */
static void load_tile(const index_ctx *c, long t0, int n, float *kt) {
    const int D = c->D;
    if (n < FD_INDEX_TILE) memset(kt, 0, sizeof(float) * (size_t)D * FD_INDEX_TILE);
    for (int j = 0; j < n; j++) {
        const size_t row = (size_t)(t0 + j) * c->key_stride;
        if (c->kind == FD_KEYS_F32) {
            const float *k = (const float *)c->keys + row;
            for (int d = 0; d < D; d++) kt[(size_t)d * FD_INDEX_TILE + j] = k[d];
        } else if (c->kind == FD_KEYS_BF16) {
            const uint16_t *k = (const uint16_t *)c->keys + row;
            for (int d = 0; d < D; d++) kt[(size_t)d * FD_INDEX_TILE + j] = fd_bf16_f32(k[d]);
        } else {
            const uint8_t *k = (const uint8_t *)c->keys + row;
            const float s = c->row_scale[t0 + j];
            for (int d = 0; d < D; d++) kt[(size_t)d * FD_INDEX_TILE + j] = fd_e4m3_f32[k[d]] * s;
        }
    }
}

static void index_job(void *p, int tid, int nthreads) {
    (void)tid;
    (void)nthreads;
    index_ctx *c = (index_ctx *)p;
    float *kt = (float *)fd_aligned_alloc(sizeof(float) * (size_t)c->D * FD_INDEX_TILE);
    if (!kt) {
        fd_atomic_store(&c->failed, 1);
        return;
    }
    float tile_out[FD_INDEX_TILE];
    for (;;) {
        const long u = fd_atomic_add(&c->next, 1) - 1;
        if (u >= c->units) break;
        const long end = (u + 1) * FD_INDEX_UNIT < c->T ? (u + 1) * FD_INDEX_UNIT : c->T;
        for (long t0 = u * FD_INDEX_UNIT; t0 < end; t0 += FD_INDEX_TILE) {
            const int n = end - t0 < FD_INDEX_TILE ? (int)(end - t0) : FD_INDEX_TILE;
            load_tile(c, t0, n, kt);
            for (int s = 0; s < c->S; s++) {
                const size_t qs = (size_t)s * c->H;
                c->kern->index_tile(c->q + qs * c->D, c->w + qs, c->H, c->D, kt, tile_out);
                memcpy(c->out + (size_t)s * c->out_stride + t0, tile_out, sizeof(float) * n);
            }
        }
    }
    fd_aligned_free(kt);
}

int fd_index_scores(const fd_quant_kernels *kern, int threads, const float *q, const float *w,
                    int S, int H, int D, int kind, const void *keys, size_t key_stride,
                    const float *row_scale, long T, float *out, size_t out_stride, char *err,
                    size_t errlen) {
    if (S < 0 || H <= 0 || D <= 0 || T < 0 || key_stride < (size_t)D || out_stride < (size_t)T ||
        (kind != FD_KEYS_F32 && kind != FD_KEYS_BF16 && kind != FD_KEYS_E4M3) ||
        (kind == FD_KEYS_E4M3 && !row_scale)) {
        if (err && errlen) snprintf(err, errlen, "index_scores: bad shapes or key kind");
        return -1;
    }
    if (S == 0 || T == 0) return 0;
    index_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern;
    c.q = q;
    c.w = w;
    c.row_scale = row_scale;
    c.keys = keys;
    c.key_stride = key_stride;
    c.out_stride = out_stride;
    c.S = S;
    c.H = H;
    c.D = D;
    c.kind = kind;
    c.T = T;
    c.units = (T + FD_INDEX_UNIT - 1) / FD_INDEX_UNIT;
    c.out = out;
    if (threads < 1) threads = 1;
    if ((long)threads > c.units) threads = (int)c.units;
    fd_pool_run(index_job, &c, threads);
    if (fd_atomic_load(&c.failed)) {
        if (err && errlen) snprintf(err, errlen, "index_scores: out of memory for the key tiles");
        return -1;
    }
    return 0;
}
