/* Routed-expert FFN and quantized linears on the persistent pool (see experts.h).
 *
 * Work is cut into units of a few weight rows and handed out through an atomic counter, so every
 * thread keeps streaming weights until the phase is done. The expert FFN has two phases with one
 * wait: (1) units of (expert, 64 rows of W1 and W3) write h for all of that expert's tokens;
 * (2) units of 64 output rows loop over the active experts' W2 rows, so each output element is
 * owned by one thread and accumulated in fp32 across experts before it is added into out.
 * Up to FD_DOT_MAX_M tokens per expert use the fused decode-and-dot kernel (decode / small
 * batches); more tokens decode the unit's rows once into fp32 scratch and run an fp32 GEMM, except
 * with bf16 activations on a variant with the bf16 dot, which takes them in token groups of
 * FD_DOT_MAX_M (fp4_dot_bf16_rows).
 */
#include "experts.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "fd_platform.h"

#define FD_ROWS_PER_UNIT 64 /* weight rows per work unit of the linears (divides FP8's 128) */
#define GEMM_ROWS 16        /* rows decoded to fp32 at a time on GEMM paths (scratch in L2) */
#define FD_TOKENS_PER_UNIT 64 /* token block of the quantized linears */
#define FD_CLAIM_BYTES (4 << 20) /* weight bytes a thread claims at once (claim_units) */

/* ---------------------------------------------------------------- variant selection */

static const fd_quant_kernels *const g_compiled[] = {
    &fd_kernels_scalar,
#if defined(FD_HAVE_X86_VARIANTS)
    &fd_kernels_avx2,
    &fd_kernels_avx2_vnni,
    &fd_kernels_avx512,
    &fd_kernels_avx512_bf16,
#endif
#if defined(FD_HAVE_NEON_VARIANTS)
    &fd_kernels_neon,
#endif
};
#define FD_N_COMPILED ((int)(sizeof g_compiled / sizeof g_compiled[0]))

static const fd_quant_kernels *volatile g_active = NULL;

int fd_kernels_compiled(const fd_quant_kernels **out, int max) {
    int n = 0;
    for (int i = 0; i < FD_N_COMPILED && n < max; i++) out[n++] = g_compiled[i];
    return n;
}

const fd_quant_kernels *fd_kernels_by_name(const char *name) {
    for (int i = 0; i < FD_N_COMPILED; i++)
        if (strcmp(g_compiled[i]->name, name) == 0) return g_compiled[i];
    return NULL;
}

int fd_kernels_supported(const fd_quant_kernels *k) {
    const fd_cpu_features *f = fd_get_cpu_features();
    if (k == &fd_kernels_scalar) return 1;
#if defined(FD_HAVE_X86_VARIANTS)
    if (k == &fd_kernels_avx2 || k == &fd_kernels_avx2_vnni)
        return f->avx2 && f->fma && f->f16c && (k == &fd_kernels_avx2 || f->avx_vnni);
    if (k == &fd_kernels_avx512 || k == &fd_kernels_avx512_bf16)
        return f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq && f->avx2 && f->fma &&
               f->f16c && (k == &fd_kernels_avx512 || (f->avx512_bf16 && f->avx512_vbmi));
#endif
#if defined(FD_HAVE_NEON_VARIANTS)
    if (k == &fd_kernels_neon) return f->neon;
#endif
    (void)f;
    return 0;
}

const fd_quant_kernels *fd_kernels_best(void) {
    for (int i = FD_N_COMPILED - 1; i >= 0; i--)
        if (fd_kernels_supported(g_compiled[i])) return g_compiled[i];
    return &fd_kernels_scalar;
}

const fd_quant_kernels *fd_kernels_active(void) {
    const fd_quant_kernels *k = g_active;
    if (!k) {
        fd_quant_tables_init();
        k = fd_kernels_best();
        g_active = k;
    }
    return k;
}

void fd_kernels_set_active(const fd_quant_kernels *k) {
    fd_quant_tables_init();
    g_active = k;
}

/* ---------------------------------------------------------------- helpers */

static void load_row(const void *x, int bf16, size_t row, int K, float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)x + row * (size_t)K;
        for (int k = 0; k < K; k++) dst[k] = fd_bf16_f32(src[k]);
    } else {
        memcpy(dst, (const float *)x + row * (size_t)K, sizeof(float) * (size_t)K);
    }
}

/* out[row, c0 + j] (+)= v[j] for j < n. */
static void store_row(void *out, int bf16, size_t row, int N, int c0, const float *v, int n,
                      int accumulate) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)out + row * (size_t)N + c0;
        for (int j = 0; j < n; j++)
            dst[j] = fd_f32_bf16(accumulate ? fd_bf16_f32(dst[j]) + v[j] : v[j]);
    } else {
        float *dst = (float *)out + row * (size_t)N + c0;
        if (accumulate)
            for (int j = 0; j < n; j++) dst[j] += v[j];
        else
            memcpy(dst, v, sizeof(float) * (size_t)n);
    }
}

/* Row stride (floats) of activation and scratch rows: one cache line more than the row, so rows
 * 4 KiB multiples long do not all map to the same L1 sets when a kernel streams 8 of them. */
static size_t padded(int n) { return (size_t)n + 16; }

static void set_err(char *err, size_t errlen, const char *msg) {
    if (err && errlen) snprintf(err, errlen, "%s", msg);
}

/* ---------------------------------------------------------------- work units */

/* Bytes of one weight row of a linear. */
static size_t weight_row_bytes(int kind, int K) {
    if (kind == FD_WEIGHT_BF16) return 2 * (size_t)K;
    return kind == FD_WEIGHT_FP4 ? (size_t)K / 2 : (size_t)K;
}

/* Threads claim runs of consecutive units, up to about FD_CLAIM_BYTES of weight rows, so each
 * streams long runs of memory instead of alternating 64-row units with the others (the hardware
 * prefetchers start over at every jump). A claim takes at most 1/(2 * threads) of the units left
 * (guided self-scheduling), so the runs shrink toward the end and no thread is left waiting on
 * another's long run. Dev VM, 2 threads, RAM read ~70 GB/s: FP8 wq_b [32768, 1024] 38 -> 50
 * GB/s, a decode step's six experts 49 -> 58 GB/s (at ~50 GB/s they were near it already). */
static int claim_units(size_t unit_bytes) {
    const size_t claim = FD_CLAIM_BYTES / (unit_bytes ? unit_bytes : 1);
    return claim < 1 ? 1 : (int)claim;
}

/* A thread's place in its claimed run: next_unit hands the run out in order and claims the next
 * from the shared counter when it runs out (returns >= units when none are left). */
typedef struct {
    long u, left;
} unit_cursor;

static long next_unit(fd_atomic_int *next, long units, int threads, int most, unit_cursor *cur) {
    while (cur->left == 0) {
        const long start = fd_atomic_load(next);
        if (start >= units) return units;
        long n = (units - start) / (2L * threads);
        n = n < 1 ? 1 : n > most ? most : n;
        if (fd_atomic_cas(next, start, start + n)) {
            cur->u = start;
            cur->left = n;
        }
    }
    cur->left--;
    return cur->u++;
}

/* ---------------------------------------------------------------- expert FFN */

/* Weight rows per work unit: long enough for contiguous streams of 32-64 KB per expert matrix,
 * short enough that 16 threads still get several units each in a decode step. */
#define FFN_ROWS 64

typedef struct {
    float *scratch; /* decoded rows: GEMM_ROWS * padded(max(D, I)) floats, or NULL */
    float *g, *u;   /* [max_m, FFN_ROWS] */
    float *ybuf;    /* [T, FFN_ROWS] */
    const float **xptr; /* [max_m] */
    const uint16_t **bptr; /* [max_m], bf16 rows for fp4_dot_bf16 */
    const int8_t **qptr;   /* [max_m], int8 rows for fp4_dot_q8 */
    const float **dptr;    /* [max_m], their block figures (steps, then sums) */
    char pad[64];
} ffn_thread;

typedef struct {
    const fd_quant_kernels *kern;
    int T, D, I;
    const fd_fp4_expert *experts;
    const float *xp;      /* [T, D] in the variant's fp4 layout */
    float *h;             /* [P, I] in the variant's fp4 layout */
    int bf16;             /* bf16 activations: h is rounded to bf16 before W2 (spec §2.7) */
    float limit;          /* swiglu_limit */
    const uint16_t *xb;   /* [T, D] bf16 input rows in fp4_bf16_layout (bf16 dot only) */
    uint16_t *hb;         /* [P, I] bf16 h in fp4_bf16_layout (bf16 dot only) */
    const int *active;    /* expert ids with at least one pair */
    int n_active;
    const int *offset;    /* [n_experts + 1]: pairs of expert e are offset[e]..offset[e+1] */
    const int *pair_tok;  /* [P] token of each pair, grouped by expert */
    const float *pair_w;  /* [P] routing weight */
    const int *perm_i;    /* [I] position of hidden element j in the fp4 layout */
    const int *perm_ib;   /* [I] the same in fp4_bf16_layout (bf16 dot only) */
    /* int8 activations (fp4_dot_q8 only): x and h quantized per 32 in fp4_q8_layout */
    const int8_t *xq;     /* [T, D] */
    const float *xd;      /* [T, D/16]: D/32 steps, then D/32 sums per row */
    int8_t *hq;           /* [P, I] */
    float *hd;            /* [P, I/16] the same */
    const int *perm_iq;   /* [I] position of hidden element j in fp4_q8_layout */
    void *out;
    int out_bf16;
    ffn_thread *th;
    int units1_per_expert, units2;
    int claim1, claim2; /* the most units a thread claims at once in each phase (claim_units) */
    int threads;
    fd_atomic_int next1, next2;
    fd_atomic_int done1; /* phase-1 units finished: phase 2 reads every h */
} ffn_ctx;

/* silu(min(g, L)) * clamp(u, -L, L) (spec §2.7: the gate has no lower bound); L <= 0: no clamp. */
static float swiglu_clamped(float g, float u, float limit) {
    if (limit > 0.0f) {
        if (g > limit) g = limit;
        if (u > limit) u = limit;
        if (u < -limit) u = -limit;
    }
    return g / (1.0f + expf(-g)) * u;
}

/* fp4_dot_bf16 for any number of activation rows: token groups of FD_DOT_MAX_M over blocks of
 * GEMM_ROWS weight rows, so a block's bytes stay in L1/L2 while every group reads them. vdpbf16ps
 * does twice the multiply-adds of an fp32 FMA per instruction, so this beats decoding to fp32 and
 * the fp32 GEMM at the 8-64 tokens per expert of a real prompt (256 experts, 6 picked). */
static void fp4_dot_bf16_rows(const fd_quant_kernels *kern, const uint8_t *w, size_t ws,
                              const uint8_t *s, size_t ss, int rows, int K,
                              const uint16_t *const *x, int m, float *y, size_t ys) {
    for (int r0 = 0; r0 < rows; r0 += GEMM_ROWS) {
        const int n = rows - r0 < GEMM_ROWS ? rows - r0 : GEMM_ROWS;
        for (int t0 = 0; t0 < m; t0 += FD_DOT_MAX_M) {
            const int mt = m - t0 < FD_DOT_MAX_M ? m - t0 : FD_DOT_MAX_M;
            kern->fp4_dot_bf16(w + (size_t)r0 * ws, ws, s + (size_t)r0 * ss, ss, n, K, x + t0, mt,
                               y + (size_t)t0 * ys + r0, ys);
        }
    }
}

/* fp4_dot_q8 for any number of activation rows, blocked as fp4_dot_bf16_rows. */
static void fp4_dot_q8_rows(const fd_quant_kernels *kern, const uint8_t *w, size_t ws,
                            const uint8_t *s, size_t ss, int rows, int K, const int8_t *const *xq,
                            const float *const *xd, int m, float *y, size_t ys) {
    for (int r0 = 0; r0 < rows; r0 += GEMM_ROWS) {
        const int n = rows - r0 < GEMM_ROWS ? rows - r0 : GEMM_ROWS;
        for (int t0 = 0; t0 < m; t0 += FD_DOT_MAX_M) {
            const int mt = m - t0 < FD_DOT_MAX_M ? m - t0 : FD_DOT_MAX_M;
            kern->fp4_dot_q8(w + (size_t)r0 * ws, ws, s + (size_t)r0 * ss, ss, n, K, xq + t0,
                             xd + t0, mt, y + (size_t)t0 * ys + r0, ys);
        }
    }
}

static void ffn_unit1(ffn_ctx *c, ffn_thread *th, int unit) {
    const fd_quant_kernels *kern = c->kern;
    const int e = c->active[unit / c->units1_per_expert];
    const int j0 = (unit % c->units1_per_expert) * FFN_ROWS;
    const int nr = c->I - j0 < FFN_ROWS ? c->I - j0 : FFN_ROWS;
    const int D = c->D, I = c->I;
    const fd_fp4_expert *ex = &c->experts[e];
    const size_t ws = (size_t)D / 2, ss = (size_t)D / 32;
    const uint8_t *w1 = ex->w1 + (size_t)j0 * ws, *s1 = ex->s1 + (size_t)j0 * ss;
    const uint8_t *w3 = ex->w3 + (size_t)j0 * ws, *s3 = ex->s3 + (size_t)j0 * ss;
    const int p0 = c->offset[e], m = c->offset[e + 1] - p0;
    const size_t DP = padded(D);
    for (int t = 0; t < m; t++) th->xptr[t] = c->xp + (size_t)c->pair_tok[p0 + t] * DP;
    if (c->xq) {
        for (int t = 0; t < m; t++) {
            th->qptr[t] = c->xq + (size_t)c->pair_tok[p0 + t] * D;
            th->dptr[t] = c->xd + (size_t)c->pair_tok[p0 + t] * (D / 16);
        }
        fp4_dot_q8_rows(kern, w1, ws, s1, ss, nr, D, th->qptr, th->dptr, m, th->g, FFN_ROWS);
        fp4_dot_q8_rows(kern, w3, ws, s3, ss, nr, D, th->qptr, th->dptr, m, th->u, FFN_ROWS);
    } else if (c->xb) {
        for (int t = 0; t < m; t++) th->bptr[t] = c->xb + (size_t)c->pair_tok[p0 + t] * D;
        fp4_dot_bf16_rows(kern, w1, ws, s1, ss, nr, D, th->bptr, m, th->g, FFN_ROWS);
        fp4_dot_bf16_rows(kern, w3, ws, s3, ss, nr, D, th->bptr, m, th->u, FFN_ROWS);
    } else if (m <= FD_DOT_MAX_M) {
        kern->fp4_dot(w1, ws, s1, ss, nr, D, th->xptr, m, th->g, FFN_ROWS);
        kern->fp4_dot(w3, ws, s3, ss, nr, D, th->xptr, m, th->u, FFN_ROWS);
    } else {
        /* 16 decoded rows at a time, so the scratch stays in L2 */
        for (int r0 = 0; r0 < nr; r0 += GEMM_ROWS) {
            const int n = nr - r0 < GEMM_ROWS ? nr - r0 : GEMM_ROWS;
            for (int r = 0; r < n; r++)
                kern->fp4_decode(w1 + (r0 + r) * ws, s1 + (r0 + r) * ss, D,
                                 th->scratch + (size_t)r * DP);
            kern->gemm_f32(th->xptr, m, th->scratch, DP, n, D, th->g + r0, FFN_ROWS);
            for (int r = 0; r < n; r++)
                kern->fp4_decode(w3 + (r0 + r) * ws, s3 + (r0 + r) * ss, D,
                                 th->scratch + (size_t)r * DP);
            kern->gemm_f32(th->xptr, m, th->scratch, DP, n, D, th->u + r0, FFN_ROWS);
        }
    }
    for (int t = 0; t < m; t++) {
        float *hrow = c->h + (size_t)(p0 + t) * padded(I);
        const float wt = c->pair_w[p0 + t];
        for (int r = 0; r < nr; r++) {
            const size_t at = (size_t)t * FFN_ROWS + r;
            float hv = swiglu_clamped(th->g[at], th->u[at], c->limit) * wt;
            if (c->bf16) {
                uint16_t hbits = fd_f32_bf16(hv);
                hv = fd_bf16_f32(hbits);
                if (c->hb) c->hb[(size_t)(p0 + t) * I + c->perm_ib[j0 + r]] = hbits;
            }
            if (c->hq)
                th->g[at] = hv; /* quantized below, a whole number of blocks */
            else
                hrow[c->perm_i[j0 + r]] = hv;
        }
        if (c->hq) { /* nr is a multiple of 32 (I is), and j0 one of FFN_ROWS */
            float *fig = c->hd + (size_t)(p0 + t) * (I / 16);
            fd_q8_quantize(th->g + (size_t)t * FFN_ROWS, nr, c->perm_iq + j0,
                           c->hq + (size_t)(p0 + t) * I, fig + j0 / 32, fig + I / 32 + j0 / 32);
        }
    }
}

static void ffn_unit2(ffn_ctx *c, ffn_thread *th, int unit) {
    const fd_quant_kernels *kern = c->kern;
    const int D = c->D, I = c->I;
    const int n0 = unit * FFN_ROWS;
    const int nr = D - n0 < FFN_ROWS ? D - n0 : FFN_ROWS;
    const size_t ws = (size_t)I / 2, ss = (size_t)I / 32, IP = padded(I);
    memset(th->ybuf, 0, sizeof(float) * (size_t)c->T * FFN_ROWS);
    for (int a = 0; a < c->n_active; a++) {
        const int e = c->active[a];
        const fd_fp4_expert *ex = &c->experts[e];
        const uint8_t *w2 = ex->w2 + (size_t)n0 * ws, *s2 = ex->s2 + (size_t)n0 * ss;
        const int p0 = c->offset[e], m = c->offset[e + 1] - p0;
        for (int t = 0; t < m; t++) th->xptr[t] = c->h + (size_t)(p0 + t) * IP;
        if (c->hq) {
            for (int t = 0; t < m; t++) {
                th->qptr[t] = c->hq + (size_t)(p0 + t) * I;
                th->dptr[t] = c->hd + (size_t)(p0 + t) * (I / 16);
            }
            fp4_dot_q8_rows(kern, w2, ws, s2, ss, nr, I, th->qptr, th->dptr, m, th->g, FFN_ROWS);
        } else if (c->hb) {
            for (int t = 0; t < m; t++) th->bptr[t] = c->hb + (size_t)(p0 + t) * I;
            fp4_dot_bf16_rows(kern, w2, ws, s2, ss, nr, I, th->bptr, m, th->g, FFN_ROWS);
        } else if (m <= FD_DOT_MAX_M) {
            kern->fp4_dot(w2, ws, s2, ss, nr, I, th->xptr, m, th->g, FFN_ROWS);
        } else {
            for (int r0 = 0; r0 < nr; r0 += GEMM_ROWS) {
                const int n = nr - r0 < GEMM_ROWS ? nr - r0 : GEMM_ROWS;
                for (int r = 0; r < n; r++)
                    kern->fp4_decode(w2 + (r0 + r) * ws, s2 + (r0 + r) * ss, I,
                                     th->scratch + (size_t)r * IP);
                kern->gemm_f32(th->xptr, m, th->scratch, IP, n, I, th->g + r0, FFN_ROWS);
            }
        }
        for (int t = 0; t < m; t++) {
            float *yrow = th->ybuf + (size_t)c->pair_tok[p0 + t] * FFN_ROWS;
            const float *part = th->g + (size_t)t * FFN_ROWS;
            for (int r = 0; r < nr; r++) yrow[r] += part[r];
        }
    }
    for (int t = 0; t < c->T; t++)
        store_row(c->out, c->out_bf16, (size_t)t, D, n0, th->ybuf + (size_t)t * FFN_ROWS,
                  nr, 1);
}

static void ffn_job(void *p, int tid, int nthreads) {
    (void)nthreads;
    ffn_ctx *c = (ffn_ctx *)p;
    ffn_thread *th = &c->th[tid];
    const int units1 = c->n_active * c->units1_per_expert;
    unit_cursor cursor = {0, 0};
    for (;;) {
        const long u = next_unit(&c->next1, units1, c->threads, c->claim1, &cursor);
        if (u >= units1) break;
        ffn_unit1(c, th, (int)u);
        fd_atomic_add(&c->done1, 1);
    }
    /* Wait for the phase-1 units other threads are still on (not for threads that never came). */
    int spins = 0;
    while (fd_atomic_load(&c->done1) < units1) {
        if (++spins < 2000)
            fd_cpu_relax();
        else
            fd_yield();
    }
    cursor.left = 0;
    for (;;) {
        const long u = next_unit(&c->next2, c->units2, c->threads, c->claim2, &cursor);
        if (u >= c->units2) break;
        ffn_unit2(c, th, (int)u);
    }
}

int fd_expert_ffn(const fd_quant_kernels *kern, int threads, const void *x, int x_bf16, int x_q8,
                  int T, int D, int I, const fd_fp4_expert *experts, int n_experts, const int32_t *ids,
                  const float *weights, int k, float limit, void *out, int out_bf16, char *err,
                  size_t errlen) {
    if (T < 0 || D <= 0 || I <= 0 || D % 32 || I % 32 || n_experts <= 0 || k <= 0) {
        set_err(err, errlen, "expert_ffn: D and I must be positive multiples of 32");
        return -1;
    }
    if (!ids && k != n_experts) {
        set_err(err, errlen, "expert_ffn: without ids, weights must have one column per expert");
        return -1;
    }
    if (T == 0) return 0;
    if (threads < 1) threads = 1;
    int rc = -1;
    const size_t P = (size_t)T * (size_t)k;
    int *offset = (int *)calloc((size_t)n_experts + 1, sizeof(int));
    int *fill = (int *)calloc((size_t)n_experts, sizeof(int));
    int *active = (int *)malloc(sizeof(int) * (size_t)n_experts);
    int *pair_tok = (int *)malloc(sizeof(int) * (P ? P : 1));
    int *pair_e = (int *)malloc(sizeof(int) * (P ? P : 1));
    float *pair_w = (float *)malloc(sizeof(float) * (P ? P : 1));
    int *perm_i = (int *)malloc(sizeof(int) * (size_t)I);
    int *perm_ib = (int *)malloc(sizeof(int) * (size_t)I);
    int *perm_iq = (int *)malloc(sizeof(int) * (size_t)I);
    int *perm_dq = (int *)malloc(sizeof(int) * (size_t)D);
    float *xp = (float *)fd_aligned_alloc(sizeof(float) * (size_t)T * padded(D));
    float *row = (float *)malloc(sizeof(float) * (size_t)D);
    float *h = NULL;
    uint16_t *hb = NULL, *xb = NULL;
    int8_t *xq = NULL, *hq = NULL;
    float *xd = NULL, *hd = NULL;
    ffn_thread *th = NULL;
    if (!offset || !fill || !active || !pair_tok || !pair_e || !pair_w || !perm_i || !perm_ib ||
        !perm_iq || !perm_dq || !xp || !row) {
        set_err(err, errlen, "expert_ffn: out of memory for the routing tables");
        goto done;
    }
    /* Group the (token, slot) pairs by expert. The ids are read once: the second pass uses the
     * checked copy (pair_e), so a caller's buffer changing under us cannot index out of range. */
    for (size_t p = 0; p < P; p++) {
        int e = ids ? ids[p] : (int)(p % (size_t)k);
        if (e < -1 || e >= n_experts) {
            set_err(err, errlen, "expert_ffn: an expert id is outside [0, number of experts)");
            goto done;
        }
        pair_e[p] = e;
        if (e >= 0) offset[e + 1]++;
    }
    int n_active = 0, max_m = 1;
    for (int e = 0; e < n_experts; e++) {
        int cnt = offset[e + 1];
        if (cnt > 0) active[n_active++] = e;
        if (cnt > max_m) max_m = cnt;
        offset[e + 1] += offset[e];
    }
    for (size_t p = 0; p < P; p++) {
        const int e = pair_e[p];
        if (e < 0) continue;
        int at = offset[e] + fill[e]++;
        pair_tok[at] = (int)(p / (size_t)k);
        pair_w[at] = weights[p];
    }
    if (n_active == 0) {
        rc = 0;
        goto done;
    }
    const size_t npairs = (size_t)offset[n_experts];
    const int q8_dot = x_q8 && kern->fp4_dot_q8 != NULL;
    const int bf16_dot = !q8_dot && x_bf16 && kern->fp4_dot_bf16 != NULL;
    /* the positions of the layouts this call's path reads (a decode step pays for each) */
    if (q8_dot) {
        for (int j = 0; j < I; j++) perm_iq[j] = fd_fp4_perm_index(kern->fp4_q8_layout, j, I);
        for (int j = 0; j < D; j++) perm_dq[j] = fd_fp4_perm_index(kern->fp4_q8_layout, j, D);
    } else {
        for (int j = 0; j < I; j++) perm_i[j] = fd_fp4_perm_index(kern->fp4_layout, j, I);
        for (int j = 0; j < I; j++) perm_ib[j] = fd_fp4_perm_index(kern->fp4_bf16_layout, j, I);
    }
    if (q8_dot) {
        xq = (int8_t *)fd_aligned_alloc((size_t)T * (size_t)D);
        xd = (float *)malloc(sizeof(float) * (size_t)T * (size_t)(D / 16));
        hq = (int8_t *)fd_aligned_alloc(npairs * (size_t)I);
        hd = (float *)malloc(sizeof(float) * npairs * (size_t)(I / 16));
        if (!xq || !xd || !hq || !hd) {
            set_err(err, errlen, "expert_ffn: out of memory for the int8 activations");
            goto done;
        }
    }
    for (int t = 0; t < T; t++) {
        load_row(x, x_bf16, (size_t)t, D, row);
        if (q8_dot)
            fd_q8_quantize(row, D, perm_dq, xq + (size_t)t * D, xd + (size_t)t * (D / 16),
                           xd + (size_t)t * (D / 16) + D / 32);
        else
            fd_fp4_permute_row(kern->fp4_layout, row, xp + (size_t)t * padded(D), D);
    }
    h = (float *)fd_aligned_alloc(sizeof(float) * npairs * padded(I));
    if (bf16_dot) {
        hb = (uint16_t *)fd_aligned_alloc(sizeof(uint16_t) * npairs * (size_t)I);
        xb = (uint16_t *)fd_aligned_alloc(sizeof(uint16_t) * (size_t)T * (size_t)D);
    }
    th = (ffn_thread *)calloc((size_t)threads, sizeof(ffn_thread));
    if (!h || !th || (bf16_dot && (!hb || !xb))) {
        set_err(err, errlen, "expert_ffn: out of memory for the hidden activations");
        goto done;
    }
    const int need_scratch = max_m > FD_DOT_MAX_M && !bf16_dot && !q8_dot;
    const size_t dmax = padded(D > I ? D : I);
    for (int i = 0; i < threads; i++) {
        th[i].g = (float *)malloc(sizeof(float) * (size_t)max_m * FFN_ROWS);
        th[i].u = (float *)malloc(sizeof(float) * (size_t)max_m * FFN_ROWS);
        th[i].ybuf = (float *)malloc(sizeof(float) * (size_t)T * FFN_ROWS);
        th[i].xptr = (const float **)malloc(sizeof(float *) * (size_t)max_m);
        th[i].bptr = (const uint16_t **)malloc(sizeof(uint16_t *) * (size_t)max_m);
        th[i].qptr = (const int8_t **)malloc(sizeof(int8_t *) * (size_t)max_m);
        th[i].dptr = (const float **)malloc(sizeof(float *) * (size_t)max_m);
        if (need_scratch)
            th[i].scratch = (float *)fd_aligned_alloc(sizeof(float) * GEMM_ROWS * dmax);
        if (!th[i].g || !th[i].u || !th[i].ybuf || !th[i].xptr || !th[i].bptr || !th[i].qptr ||
            !th[i].dptr || (need_scratch && !th[i].scratch)) {
            set_err(err, errlen, "expert_ffn: out of memory for per-thread buffers");
            goto done;
        }
    }
    ffn_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern;
    c.T = T;
    c.D = D;
    c.I = I;
    c.experts = experts;
    c.xp = xp;
    c.h = h;
    c.bf16 = x_bf16;
    c.limit = limit;
    if (bf16_dot)
        for (int t = 0; t < T; t++)
            fd_fp4_permute_row_bf16(kern->fp4_bf16_layout, (const uint16_t *)x + (size_t)t * D,
                                    xb + (size_t)t * D, D);
    c.xb = xb;
    c.hb = bf16_dot ? hb : NULL;
    c.xq = xq;
    c.xd = xd;
    c.hq = hq;
    c.hd = hd;
    c.perm_iq = perm_iq;
    c.active = active;
    c.n_active = n_active;
    c.offset = offset;
    c.pair_tok = pair_tok;
    c.pair_w = pair_w;
    c.perm_i = perm_i;
    c.perm_ib = perm_ib;
    c.out = out;
    c.out_bf16 = out_bf16;
    c.th = th;
    c.units1_per_expert = (I + FFN_ROWS - 1) / FFN_ROWS;
    c.units2 = (D + FFN_ROWS - 1) / FFN_ROWS;
    c.claim1 = claim_units((size_t)FFN_ROWS * (size_t)D);
    c.claim2 = claim_units((size_t)FFN_ROWS * (size_t)(I / 2) * (size_t)n_active);
    c.threads = threads;
    fd_pool_run(ffn_job, &c, threads);
    rc = 0;
done:
    if (th)
        for (int i = 0; i < threads; i++) {
            free(th[i].g);
            free(th[i].u);
            free(th[i].ybuf);
            free((void *)th[i].xptr);
            free((void *)th[i].bptr);
            free((void *)th[i].qptr);
            free((void *)th[i].dptr);
            fd_aligned_free(th[i].scratch);
        }
    free(th);
    fd_aligned_free(xq);
    fd_aligned_free(hq);
    free(xd);
    free(hd);
    free(perm_iq);
    free(perm_dq);
    fd_aligned_free(h);
    fd_aligned_free(hb);
    fd_aligned_free(xb);
    fd_aligned_free(xp);
    free(row);
    free(perm_i);
    free(perm_ib);
    free(pair_w);
    free(pair_tok);
    free(pair_e);
    free(active);
    free(fill);
    free(offset);
    return rc;
}

/* ---------------------------------------------------------------- quantized linears */

typedef struct {
    const fd_quant_kernels *kern;
    int kind, M, K, N, ktiles;
    const float *xp; /* [M, K] (fp4: in the variant's layout) */
    const uint16_t *xb; /* [M, K] bf16 input in fp4_bf16_layout, when the variant has fp4_dot_bf16 */
    const int8_t *xq;   /* [M, K] int8 input in fp4_q8_layout (FD_WEIGHT_FP4_INT8) */
    const float *xd;    /* [M, K/16] its block figures: K/32 steps, then K/32 sums */
    const uint16_t *x16; /* [M, K] the caller's bf16 input (natural order), for gemm_bf16 */
    const uint16_t *x8;  /* [M, x8_words] the same in fp8_bf16_layout, for fp8_dot_bf16 */
    size_t x8_words;
    const uint8_t *w, *scale;
    void *out;
    int out_bf16;
    int row_units, units;
    int claim; /* the most units a thread claims at once (claim_units) */
    int threads;
    void (*fp8_dot)(const uint8_t *, size_t, const float *, int, int, const float *const *, int,
                    float *, size_t); /* fp8_dot, or fp8_dot_finite for checked weights */
    int groups, group_rows; /* x row t holds `groups` inputs of K; weight rows g*group_rows.. use the g-th */
    fd_atomic_int next;
    fd_atomic_int failed; /* a thread could not allocate its scratch */
} lin_ctx;

/* The float scales of an FP8 weight's 128-row tile `tile` (scale [ceil(N/128), ktiles] E8M0). */
static void tile_scales(const uint8_t *scale, int tile, int ktiles, float *ts) {
    const uint8_t *srow = scale + (size_t)tile * (size_t)ktiles;
    for (int kt = 0; kt < ktiles; kt++) ts[kt] = fd_e8m0_f32[srow[kt]];
}

static void lin_job(void *p, int tid, int nthreads) {
    (void)tid;
    (void)nthreads;
    lin_ctx *c = (lin_ctx *)p;
    const fd_quant_kernels *kern = c->kern;
    const int K = c->K;
    float *scratch = NULL;
    uint16_t *scratch16 = NULL; /* decoded FP8 rows as bf16 (gemm_bf16) */
    float ybuf[FD_TOKENS_PER_UNIT * FD_ROWS_PER_UNIT];
    float ts_buf[64];
    float *ts = c->ktiles <= 64 ? ts_buf : (float *)malloc(sizeof(float) * (size_t)c->ktiles);
    const float *xptr[FD_TOKENS_PER_UNIT];
    const uint16_t *bptr[FD_TOKENS_PER_UNIT];
    const int8_t *qptr[FD_TOKENS_PER_UNIT];
    const float *dptr[FD_TOKENS_PER_UNIT];
    if (!ts) {
        fd_atomic_store(&c->failed, 1);
        return;
    }
    unit_cursor cursor = {0, 0};
    for (;;) {
        const long u = next_unit(&c->next, c->units, c->threads, c->claim, &cursor);
        if (u >= c->units) break;
        const int n0 = (int)(u % c->row_units) * FD_ROWS_PER_UNIT;
        const int t0 = (int)(u / c->row_units) * FD_TOKENS_PER_UNIT;
        const int nr = c->N - n0 < FD_ROWS_PER_UNIT ? c->N - n0 : FD_ROWS_PER_UNIT;
        const int m = c->M - t0 < FD_TOKENS_PER_UNIT ? c->M - t0 : FD_TOKENS_PER_UNIT;
        const size_t g = (size_t)(n0 / c->group_rows), G = (size_t)c->groups;
        for (int t = 0; t < m; t++) xptr[t] = c->xp + ((size_t)(t0 + t) * G + g) * padded(K);
        const uint8_t *w, *s = NULL;
        size_t ws, ss = 0;
        if (c->kind == FD_WEIGHT_BF16) {
            ws = (size_t)K; /* elements */
            w = c->w + (size_t)n0 * ws * 2;
        } else if (c->kind == FD_WEIGHT_FP8) {
            ws = (size_t)K;
            w = c->w + (size_t)n0 * ws;
            tile_scales(c->scale, n0 / 128, c->ktiles, ts);
        } else {
            ws = (size_t)K / 2;
            ss = (size_t)K / 32;
            w = c->w + (size_t)n0 * ws;
            s = c->scale + (size_t)n0 * ss;
        }
        if (c->kind == FD_WEIGHT_FP4 && c->xq) { /* any m, as the expert FFN */
            for (int t = 0; t < m; t++) {
                qptr[t] = c->xq + ((size_t)(t0 + t) * G + g) * K;
                dptr[t] = c->xd + ((size_t)(t0 + t) * G + g) * (K / 16);
            }
            fp4_dot_q8_rows(kern, w, ws, s, ss, nr, K, qptr, dptr, m, ybuf, FD_ROWS_PER_UNIT);
        } else if (c->kind == FD_WEIGHT_FP4 && c->xb) { /* any m, as the expert FFN */
            for (int t = 0; t < m; t++) bptr[t] = c->xb + ((size_t)(t0 + t) * G + g) * K;
            fp4_dot_bf16_rows(kern, w, ws, s, ss, nr, K, bptr, m, ybuf, FD_ROWS_PER_UNIT);
        } else if (m <= FD_DOT_MAX_M && c->kind == FD_WEIGHT_FP8 && c->x16 && kern->fp8_dot_bf16) {
            for (int t = 0; t < m; t++) bptr[t] = c->x8 + ((size_t)(t0 + t) * G + g) * c->x8_words;
            kern->fp8_dot_bf16(w, ws, ts, nr, K, bptr, m, ybuf, FD_ROWS_PER_UNIT);
        } else if (m <= FD_DOT_MAX_M) {
            if (c->kind == FD_WEIGHT_BF16)
                kern->bf16_dot((const uint16_t *)w, ws, nr, K, xptr, m, ybuf, FD_ROWS_PER_UNIT);
            else if (c->kind == FD_WEIGHT_FP8)
                c->fp8_dot(w, ws, ts, nr, K, xptr, m, ybuf, FD_ROWS_PER_UNIT);
            else
                kern->fp4_dot(w, ws, s, ss, nr, K, xptr, m, ybuf, FD_ROWS_PER_UNIT);
        } else if (c->x16 && kern->gemm_bf16 && c->kind != FD_WEIGHT_FP4) {
            /* bf16 activations: the weight rows as bf16 (BF16 as stored; FP8 decoded to fp32 and
             * cut to its top half, exact: an E4M3 value times a power of two has <= 4
             * significant bits) and the vdpbf16ps GEMM. */
            for (int t = 0; t < m; t++) bptr[t] = c->x16 + ((size_t)(t0 + t) * G + g) * K;
            if (c->kind == FD_WEIGHT_FP8 && (!scratch || !scratch16)) {
                if (!scratch)
                    scratch = (float *)fd_aligned_alloc(sizeof(float) * GEMM_ROWS * padded(K));
                if (!scratch16)
                    scratch16 =
                        (uint16_t *)fd_aligned_alloc(sizeof(uint16_t) * GEMM_ROWS * padded(K));
                if (!scratch || !scratch16) {
                    fd_atomic_store(&c->failed, 1);
                    break;
                }
            }
            for (int r0 = 0; r0 < nr; r0 += GEMM_ROWS) {
                const int n = nr - r0 < GEMM_ROWS ? nr - r0 : GEMM_ROWS;
                const uint16_t *rows = (const uint16_t *)w + (size_t)r0 * ws;
                size_t ldr = ws;
                if (c->kind == FD_WEIGHT_FP8) {
                    for (int r = 0; r < n; r++) {
                        float *dst = scratch + (size_t)r * padded(K);
                        uint16_t *dst16 = scratch16 + (size_t)r * padded(K);
                        kern->fp8_decode(w + (r0 + r) * ws, ts, K, dst);
                        for (int k = 0; k < K; k++) { /* vectorizes */
                            uint32_t bits;
                            memcpy(&bits, dst + k, sizeof bits);
                            dst16[k] = (uint16_t)(bits >> 16);
                        }
                    }
                    rows = scratch16;
                    ldr = padded(K);
                }
                kern->gemm_bf16(bptr, m, rows, ldr, n, K, ybuf + r0, FD_ROWS_PER_UNIT);
            }
        } else {
            if (!scratch) {
                scratch = (float *)fd_aligned_alloc(sizeof(float) * GEMM_ROWS * padded(K));
                if (!scratch) {
                    fd_atomic_store(&c->failed, 1);
                    break;
                }
            }
            for (int r0 = 0; r0 < nr; r0 += GEMM_ROWS) {
                const int n = nr - r0 < GEMM_ROWS ? nr - r0 : GEMM_ROWS;
                for (int r = 0; r < n; r++) {
                    float *dst = scratch + (size_t)r * padded(K);
                    if (c->kind == FD_WEIGHT_BF16) {
                        const uint16_t *wr = (const uint16_t *)w + (r0 + r) * ws;
                        for (int k = 0; k < K; k++) dst[k] = fd_bf16_f32(wr[k]);
                    } else if (c->kind == FD_WEIGHT_FP8)
                        kern->fp8_decode(w + (r0 + r) * ws, ts, K, dst);
                    else
                        kern->fp4_decode(w + (r0 + r) * ws, s + (r0 + r) * ss, K, dst);
                }
                kern->gemm_f32(xptr, m, scratch, padded(K), n, K, ybuf + r0, FD_ROWS_PER_UNIT);
            }
        }
        for (int t = 0; t < m; t++)
            store_row(c->out, c->out_bf16, (size_t)(t0 + t), c->N, n0,
                      ybuf + (size_t)t * FD_ROWS_PER_UNIT, nr, 0);
    }
    fd_aligned_free(scratch);
    fd_aligned_free(scratch16);
    if (ts != ts_buf) free(ts);
}

int fd_fp8_nan_free(const uint8_t *w, size_t n) {
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (uint8_t)(w[i] | 0x80) == 0xFF; /* vectorizes */
    return !bad;
}

int fd_quant_linear(const fd_quant_kernels *kern, int threads, int kind, const void *x, int x_bf16,
                    int M, int groups, int K, const uint8_t *w, const uint8_t *scale, int N,
                    void *out, int out_bf16, char *err, size_t errlen) {
    const int int8 = kind == FD_WEIGHT_FP4_INT8 && kern->fp4_dot_q8 != NULL;
    if (kind == FD_WEIGHT_FP4_INT8) kind = FD_WEIGHT_FP4;
    if (M < 0 || K <= 0 || N <= 0 || (kind == FD_WEIGHT_FP4 && K % 32)) {
        set_err(err, errlen, "linear: K and N must be positive (FP4: K a multiple of 32)");
        return -1;
    }
    if (groups < 1 || N % groups || (groups > 1 && (N / groups) % FD_ROWS_PER_UNIT)) {
        set_err(err, errlen, "linear: groups must divide N into multiples of 64 rows");
        return -1;
    }
    if (M == 0) return 0;
    if (threads < 1) threads = 1;
    const int finite = kind == FD_WEIGHT_FP8_FINITE;
    if (finite) kind = FD_WEIGHT_FP8;
    const int rows_in = M;
    M *= groups; /* x as M*groups rows of K; the output keeps its M rows of N */
    /* the activations as the variant reads them: fp32 rows (fp4: in its layout), and for bf16
     * input the FP4 and FP8 dot kernels' own orders where they have one */
    const int want_xb = !int8 && x_bf16 && kind == FD_WEIGHT_FP4 && kern->fp4_dot_bf16;
    const int want_x8 = x_bf16 && kind == FD_WEIGHT_FP8 && kern->fp8_dot_bf16 &&
                        kern->fp8_bf16_layout != FD_FP8_NATURAL;
    const size_t x8_words = want_x8 ? fd_fp8_row_words(kern->fp8_bf16_layout, K) : (size_t)K;
    float *xp = (float *)fd_aligned_alloc(sizeof(float) * (size_t)M * padded(K));
    float *row = (float *)malloc(sizeof(float) * (size_t)K);
    uint16_t *xb =
        want_xb ? (uint16_t *)fd_aligned_alloc(sizeof(uint16_t) * (size_t)M * (size_t)K) : NULL;
    uint16_t *x8 = want_x8 ? (uint16_t *)fd_aligned_alloc(sizeof(uint16_t) * (size_t)M * x8_words)
                           : NULL;
    int8_t *xq = int8 ? (int8_t *)fd_aligned_alloc((size_t)M * (size_t)K) : NULL;
    float *xd = int8 ? (float *)malloc(sizeof(float) * (size_t)M * (size_t)(K / 16)) : NULL;
    int *pos = int8 ? (int *)malloc(sizeof(int) * (size_t)K) : NULL;
    int rc = 0;
    if (!xp || !row || (want_xb && !xb) || (want_x8 && !x8) || (int8 && (!xq || !xd || !pos))) {
        set_err(err, errlen, "linear: out of memory for the activations");
        rc = -1;
        goto done;
    }
    if (int8)
        for (int k = 0; k < K; k++) pos[k] = fd_fp4_perm_index(kern->fp4_q8_layout, k, K);
    for (int t = 0; t < M; t++) {
        if (int8) {
            load_row(x, x_bf16, (size_t)t, K, row);
            fd_q8_quantize(row, K, pos, xq + (size_t)t * K, xd + (size_t)t * (K / 16),
                           xd + (size_t)t * (K / 16) + K / 32);
        } else if (kind == FD_WEIGHT_FP4) {
            load_row(x, x_bf16, (size_t)t, K, row);
            fd_fp4_permute_row(kern->fp4_layout, row, xp + (size_t)t * padded(K), K);
        } else {
            load_row(x, x_bf16, (size_t)t, K, xp + (size_t)t * padded(K));
        }
        const uint16_t *x16 = (const uint16_t *)x + (size_t)t * K;
        if (xb) fd_fp4_permute_row_bf16(kern->fp4_bf16_layout, x16, xb + (size_t)t * K, K);
        if (x8) fd_fp8_permute_row_bf16(kern->fp8_bf16_layout, x16, x8 + (size_t)t * x8_words, K);
    }
    lin_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern;
    c.kind = kind;
    c.fp8_dot = finite && kern->fp8_dot_finite ? kern->fp8_dot_finite : kern->fp8_dot;
    c.M = rows_in;
    c.K = K;
    c.N = N;
    c.groups = groups;
    c.group_rows = N / groups;
    c.ktiles = (K + 127) / 128;
    c.xp = xp;
    c.xb = xb;
    c.xq = xq;
    c.xd = xd;
    c.x16 = x_bf16 ? (const uint16_t *)x : NULL;
    c.x8 = x8 ? x8 : c.x16;
    c.x8_words = x8_words;
    c.w = w;
    c.scale = scale;
    c.out = out;
    c.out_bf16 = out_bf16;
    c.row_units = (N + FD_ROWS_PER_UNIT - 1) / FD_ROWS_PER_UNIT;
    c.units = c.row_units * ((rows_in + FD_TOKENS_PER_UNIT - 1) / FD_TOKENS_PER_UNIT);
    c.claim = claim_units((size_t)FD_ROWS_PER_UNIT * weight_row_bytes(kind, K));
    c.threads = threads;
    fd_pool_run(lin_job, &c, threads);
    if (fd_atomic_load(&c.failed)) {
        set_err(err, errlen, "linear: out of memory for the decode scratch");
        rc = -1;
    }
done:
    fd_aligned_free(xq);
    free(xd);
    free(pos);
    fd_aligned_free(x8);
    fd_aligned_free(xb);
    fd_aligned_free(xp);
    free(row);
    return rc;
}

typedef struct {
    const fd_quant_kernels *kern;
    const uint8_t *w, *scale;
    int K, first, n, ktiles;
    float *out;
    int claim, threads;
    fd_atomic_int next;
    fd_atomic_int failed;
} decode_ctx;

static void decode_job(void *p, int tid, int nthreads) {
    (void)tid;
    (void)nthreads;
    decode_ctx *c = (decode_ctx *)p;
    float ts_buf[64];
    float *ts = c->ktiles <= 64 ? ts_buf : (float *)malloc(sizeof(float) * (size_t)c->ktiles);
    if (!ts) {
        fd_atomic_store(&c->failed, 1);
        return;
    }
    const long units = (c->n + FD_ROWS_PER_UNIT - 1) / FD_ROWS_PER_UNIT;
    unit_cursor cursor = {0, 0};
    int tile = -1;
    for (;;) {
        const long u = next_unit(&c->next, units, c->threads, c->claim, &cursor);
        if (u >= units) break;
        const int r0 = (int)u * FD_ROWS_PER_UNIT;
        const int nr = c->n - r0 < FD_ROWS_PER_UNIT ? c->n - r0 : FD_ROWS_PER_UNIT;
        for (int r = r0; r < r0 + nr; r++) {
            const int row = c->first + r;
            if (row / 128 != tile) { /* a unit may straddle two tiles when `first` is not aligned */
                tile = row / 128;
                tile_scales(c->scale, tile, c->ktiles, ts);
            }
            c->kern->fp8_decode(c->w + (size_t)row * c->K, ts, c->K, c->out + (size_t)r * c->K);
        }
    }
    if (ts != ts_buf) free(ts);
}

int fd_fp8_decode_rows(const fd_quant_kernels *kern, int threads, const uint8_t *w,
                       const uint8_t *scale, int K, int first, int n, float *out, char *err,
                       size_t errlen) {
    if (K <= 0 || first < 0 || n < 0) {
        set_err(err, errlen, "fp8_decode_rows: K must be positive, first and n not negative");
        return -1;
    }
    if (n == 0) return 0;
    decode_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern;
    c.w = w;
    c.scale = scale;
    c.K = K;
    c.first = first;
    c.n = n;
    c.ktiles = (K + 127) / 128;
    c.out = out;
    c.claim = claim_units((size_t)FD_ROWS_PER_UNIT * (size_t)K);
    c.threads = threads < 1 ? 1 : threads;
    fd_pool_run(decode_job, &c, c.threads);
    if (fd_atomic_load(&c.failed)) {
        set_err(err, errlen, "fp8_decode_rows: out of memory for the tile scales");
        return -1;
    }
    return 0;
}
