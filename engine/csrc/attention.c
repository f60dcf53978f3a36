/* A decode token's sink attention on the thread pool (see attention.h).
 *
 * Three phases with a wait between them, units handed out through atomic counters:
 *   1. tiles of ATT_TILE rows: widened to fp32 once, logits[h, t] = q[h] . row_t (gemm_f32 over
 *      the tile), and the tile written transposed into rows_t [D, N] for phase 3;
 *   2. heads: p[h, t] = exp(scale * logits - max) / (sum + exp(sink - max)), in place;
 *   3. blocks of ATT_COLS output columns: out[h, d] = p[h] . rows_t[d] (gemm_f32 over all rows).
 * Every sum has a fixed order, so the result does not depend on the thread count.
 */
#include "attention.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "fd_platform.h"

#define ATT_TILE 64 /* candidate rows per phase-1 unit */
#define ATT_COLS 64 /* output columns per phase-3 unit */
#define ATT_MAX_SETS 4

typedef struct {
    const fd_quant_kernels *kern;
    const float *q, *sink;
    float scale;
    int H, D, n_sets;
    fd_row_set sets[ATT_MAX_SETS];
    long first[ATT_MAX_SETS + 1]; /* row index where each set starts; first[n_sets] = N */
    long N, tiles;
    float *logits; /* [H, N] */
    float *rows_t; /* [D, N] */
    float *out;
    const float **qrows, **prows; /* H pointers each */
    fd_atomic_int next1, done1, next2, done2, next3;
    fd_atomic_int failed;
} att_ctx;

static void wait_for(fd_atomic_int *done, long target) {
    int spins = 0;
    while (fd_atomic_load(done) < target) {
        if (++spins < 2000)
            fd_cpu_relax();
        else
            fd_yield();
    }
}

/* Row t (of all sets) widened into dst[D]. */
static void load_row(const att_ctx *c, long t, float *dst) {
    int s = 0;
    while (t >= c->first[s + 1]) s++;
    const fd_row_set *set = &c->sets[s];
    const size_t at = (size_t)(t - c->first[s]) * set->stride;
    if (set->kind == FD_ROWS_F32) {
        memcpy(dst, (const float *)set->rows + at, sizeof(float) * (size_t)c->D);
    } else if (set->kind == FD_ROWS_BF16) {
        const uint16_t *src = (const uint16_t *)set->rows + at;
        for (int d = 0; d < c->D; d++) dst[d] = fd_bf16_f32(src[d]);
    } else { /* the packed FP8 rows: codes x 2^(e-127) per 64, then the bf16 rope part */
        const long r = t - c->first[s];
        const int nope = set->nope, blocks = nope / 64, rope = c->D - nope;
        const uint8_t *codes = (const uint8_t *)set->rows + at;
        const uint8_t *exps = set->exps + (size_t)r * blocks;
        for (int b = 0; b < blocks; b++) {
            const float scale = fd_e8m0_f32[exps[b]];
            for (int j = 0; j < 64; j++) dst[b * 64 + j] = fd_e4m3_f32[codes[b * 64 + j]] * scale;
        }
        const uint16_t *rp = set->rope + (size_t)r * rope;
        for (int d = 0; d < rope; d++) dst[nope + d] = fd_bf16_f32(rp[d]);
    }
}

static void tile_unit(att_ctx *c, long u, float *tile) {
    const int D = c->D;
    const long t0 = u * ATT_TILE;
    const int n = c->N - t0 < ATT_TILE ? (int)(c->N - t0) : ATT_TILE;
    for (int j = 0; j < n; j++) load_row(c, t0 + j, tile + (size_t)j * D);
    c->kern->gemm_f32(c->qrows, c->H, tile, (size_t)D, n, D, c->logits + t0, (size_t)c->N);
    for (int d = 0; d < D; d++) {
        float *dst = c->rows_t + (size_t)d * c->N + t0;
        for (int j = 0; j < n; j++) dst[j] = tile[(size_t)j * D + d];
    }
}

static void softmax_unit(att_ctx *c, int h) {
    float *l = c->logits + (size_t)h * c->N;
    const float sink = c->sink[h];
    float mx = sink;
    for (long t = 0; t < c->N; t++) {
        l[t] *= c->scale;
        mx = l[t] > mx ? l[t] : mx;
    }
    float sum = 0.0f;
    for (long t = 0; t < c->N; t++) {
        l[t] = expf(l[t] - mx);
        sum += l[t];
    }
    const float inv = 1.0f / (sum + expf(sink - mx));
    for (long t = 0; t < c->N; t++) l[t] *= inv;
}

static void att_job(void *p, int tid, int nthreads) {
    (void)tid;
    (void)nthreads;
    att_ctx *c = (att_ctx *)p;
    float *tile = (float *)fd_aligned_alloc(sizeof(float) * ATT_TILE * (size_t)c->D);
    if (!tile) fd_atomic_store(&c->failed, 1);
    for (;;) { /* a thread without scratch still counts its units, so no one waits forever */
        const long u = fd_atomic_add(&c->next1, 1) - 1;
        if (u >= c->tiles) break;
        if (tile) tile_unit(c, u, tile);
        fd_atomic_add(&c->done1, 1);
    }
    fd_aligned_free(tile);
    wait_for(&c->done1, c->tiles);
    for (;;) {
        const long h = fd_atomic_add(&c->next2, 1) - 1;
        if (h >= c->H) break;
        softmax_unit(c, (int)h);
        fd_atomic_add(&c->done2, 1);
    }
    wait_for(&c->done2, c->H);
    const long blocks = (c->D + ATT_COLS - 1) / ATT_COLS;
    for (;;) {
        const long b = fd_atomic_add(&c->next3, 1) - 1;
        if (b >= blocks) break;
        const int d0 = (int)b * ATT_COLS, n = c->D - d0 < ATT_COLS ? c->D - d0 : ATT_COLS;
        c->kern->gemm_f32(c->prows, c->H, c->rows_t + (size_t)d0 * c->N, (size_t)c->N, n,
                          (int)c->N, c->out + d0, (size_t)c->D);
    }
}

int fd_sink_attention(const fd_quant_kernels *kern, int threads, const float *q, float scale,
                      const float *sink, int H, int D, const fd_row_set *sets, int n_sets,
                      float *out, char *err, size_t errlen) {
    long N = 0;
    int bad = H <= 0 || D <= 0 || n_sets < 1 || n_sets > ATT_MAX_SETS;
    for (int s = 0; !bad && s < n_sets; s++) {
        const fd_row_set *set = &sets[s];
        const int fp8 = set->kind == FD_ROWS_FP8;
        bad = set->count < 0 || (set->kind != FD_ROWS_F32 && set->kind != FD_ROWS_BF16 && !fp8) ||
              (set->count && (!set->rows || set->stride < (size_t)(fp8 ? set->nope : D))) ||
              (fp8 && set->count &&
               (set->nope <= 0 || set->nope % 64 || set->nope > D || !set->exps ||
                (set->nope < D && !set->rope)));
        N += sets[s].count;
    }
    if (bad || N < 1 || N > (1L << 30)) {
        if (err && errlen) snprintf(err, errlen, "sink_attention: bad shapes or row kinds");
        return -1;
    }
    att_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern;
    c.q = q;
    c.sink = sink;
    c.scale = scale;
    c.H = H;
    c.D = D;
    c.n_sets = n_sets;
    for (int s = 0; s < n_sets; s++) {
        c.sets[s] = sets[s];
        c.first[s + 1] = c.first[s] + sets[s].count;
    }
    c.N = N;
    c.tiles = (N + ATT_TILE - 1) / ATT_TILE;
    c.out = out;
    c.logits = (float *)fd_aligned_alloc(sizeof(float) * (size_t)H * (size_t)N);
    c.rows_t = (float *)fd_aligned_alloc(sizeof(float) * (size_t)D * (size_t)N);
    c.qrows = (const float **)fd_aligned_alloc(sizeof(float *) * 2 * (size_t)H);
    if (!c.logits || !c.rows_t || !c.qrows) {
        fd_aligned_free(c.logits);
        fd_aligned_free(c.rows_t);
        fd_aligned_free((void *)c.qrows);
        if (err && errlen) snprintf(err, errlen, "sink_attention: out of memory for the scores");
        return -1;
    }
    c.prows = c.qrows + H;
    for (int h = 0; h < H; h++) {
        c.qrows[h] = q + (size_t)h * D;
        c.prows[h] = c.logits + (size_t)h * N;
    }
    if (threads < 1) threads = 1;
    fd_pool_run(att_job, &c, threads);
    fd_aligned_free(c.logits);
    fd_aligned_free(c.rows_t);
    fd_aligned_free((void *)c.qrows);
    if (fd_atomic_load(&c.failed)) {
        if (err && errlen) snprintf(err, errlen, "sink_attention: out of memory for a row tile");
        return -1;
    }
    return 0;
}
