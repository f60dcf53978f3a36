/* What this CPU (and its OS) can execute, detected once at import.
 *
 * Kernels pick their SIMD variant from this at run time, so one build runs on every CPU. A feature
 * counts only when the OS also saves its register state (XCR0), as ggml and the kernel docs require.
 */
#ifndef FD_CPU_FEATURES_H
#define FD_CPU_FEATURES_H

typedef struct {
    int sse42, avx, avx2, fma, f16c, avx_vnni;
    int avx512f, avx512bw, avx512vl, avx512dq, avx512_vnni, avx512_bf16, avx512_vbmi;
    int amx_tile, amx_int8, amx_bf16;
    int neon, dotprod, sve;
    int logical_cores;
} fd_cpu_features;

/* Filled on first call; later calls return the cached copy. */
const fd_cpu_features *fd_get_cpu_features(void);

#endif
