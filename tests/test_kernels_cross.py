"""The NEON variant checked on an x86 machine: the kernels are cross-compiled for AArch64 with a
small C driver and run under qemu-user, comparing every NEON primitive (and the expert FFN built
on them, threaded) with the scalar reference on the same random inputs.

Runs only where `aarch64-linux-gnu-gcc` and `qemu-aarch64` exist (Debian: gcc-aarch64-linux-gnu,
qemu-user); on an ARM machine test_kernels.py runs the NEON variant natively instead.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "engine" / "csrc"
CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")

DRIVER = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "attention.h"
#include "experts.h"
#include "indexer.h"
#include "quant_kernels.h"

static unsigned long long rng = 88172645463325252ull;
static unsigned next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (unsigned)rng; }
static float frand(void) { return (float)((int)(next() % 2001) - 1000) / 500.0f; }

/* |a - b| relative to the reference's magnitude (plus a floor) */
static double rel(const float *a, const float *b, int n) {
    double worst = 0, mag = 1e-6;
    for (int i = 0; i < n; i++) mag = fmax(mag, fabs(b[i]));
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - b[i]) / mag);
    return worst;
}

#define CHECK(name, err) do { double e_ = (err); printf("%-28s %.3g\n", name, e_); \
    if (!(e_ <= 1e-5)) failures++; } while (0)

int main(void) {
    int failures = 0;
    fd_quant_tables_init();
    const fd_quant_kernels *S = &fd_kernels_scalar, *N = &fd_kernels_neon;
    enum { ROWS = 19, K = 320, M = 4 };
    static uint8_t w4[ROWS * K / 2], s4[ROWS * K / 32], w8[ROWS * K];
    static float x[M][K], xs[M][K], xn[M][K], ys[M * ROWS], yn[M * ROWS];
    static float ds[K], dn[K], dn_nat[K];
    for (int i = 0; i < ROWS * K / 2; i++) w4[i] = (uint8_t)next();
    for (int i = 0; i < ROWS * K / 32; i++) s4[i] = (uint8_t)(120 + next() % 9);
    for (int i = 0; i < ROWS * K; i++) { w8[i] = (uint8_t)next(); if ((w8[i] & 0x7F) == 0x7F) w8[i] = 0x3C; }
    for (int t = 0; t < M; t++) for (int k = 0; k < K; k++) x[t][k] = frand();
    for (int t = 0; t < M; t++) {
        fd_fp4_permute_row(S->fp4_layout, x[t], xs[t], K);
        fd_fp4_permute_row(N->fp4_layout, x[t], xn[t], K);
    }
    const float *ps[M] = {xs[0], xs[1], xs[2], xs[3]}, *pn[M] = {xn[0], xn[1], xn[2], xn[3]};
    const float *px[M] = {x[0], x[1], x[2], x[3]};
    for (int m = 1; m <= M; m++) {
        S->fp4_dot(w4, K / 2, s4, K / 32, ROWS, K, ps, m, ys, ROWS);
        N->fp4_dot(w4, K / 2, s4, K / 32, ROWS, K, pn, m, yn, ROWS);
        CHECK("fp4_dot", rel(yn, ys, m * ROWS));
    }
    /* int8 activations: the same rows quantized, in natural order for the scalar reference and
     * in the NEON layout (FD_FP4_EVEN_ODD); each block's integer sum is exact on both */
    {
        static int8_t qs[M][K], qn[M][K];
        static float fs[M][K / 16], fn[M][K / 16];
        static int pos[K];
        for (int k = 0; k < K; k++) pos[k] = fd_fp4_perm_index(N->fp4_q8_layout, k, K);
        for (int t = 0; t < M; t++) {
            fd_q8_quantize(x[t], K, NULL, qs[t], fs[t], fs[t] + K / 32);
            fd_q8_quantize(x[t], K, pos, qn[t], fn[t], fn[t] + K / 32);
        }
        const int8_t *qps[M] = {qs[0], qs[1], qs[2], qs[3]}, *qpn[M] = {qn[0], qn[1], qn[2], qn[3]};
        const float *fps[M] = {fs[0], fs[1], fs[2], fs[3]}, *fpn[M] = {fn[0], fn[1], fn[2], fn[3]};
        for (int m = 1; m <= M; m++) {
            S->fp4_dot_q8(w4, K / 2, s4, K / 32, ROWS, K, qps, fps, m, ys, ROWS);
            N->fp4_dot_q8(w4, K / 2, s4, K / 32, ROWS, K, qpn, fpn, m, yn, ROWS);
            CHECK("fp4_dot_q8", rel(yn, ys, m * ROWS));
        }
    }
    S->fp4_decode(w4, s4, K, ds);
    N->fp4_decode(w4, s4, K, dn);
    for (int k = 0; k < K; k++) dn_nat[k] = dn[fd_fp4_perm_index(N->fp4_layout, k, K)];
    CHECK("fp4_decode (exact)", memcmp(ds, dn_nat, sizeof ds) == 0 ? 0.0 : 1.0);
    float ts[(K + 127) / 128] = {0.25f, 0.125f, 2.0f};
    for (int m = 1; m <= M; m++) {
        S->fp8_dot(w8, K, ts, ROWS, K - 7, px, m, ys, ROWS); /* ragged last tile and 8-tail */
        N->fp8_dot(w8, K, ts, ROWS, K - 7, px, m, yn, ROWS);
        CHECK("fp8_dot", rel(yn, ys, m * ROWS));
    }
    static uint8_t all[256];
    for (int i = 0; i < 256; i++) all[i] = (uint8_t)i;
    float one[2] = {1.0f, 1.0f}, es[256], en[256];
    S->fp8_decode(all, one, 256, es);
    N->fp8_decode(all, one, 256, en);
    int same = 1;
    for (int i = 0; i < 256; i++)
        same &= (isnan(es[i]) && isnan(en[i])) || memcmp(&es[i], &en[i], 4) == 0;
    CHECK("fp8_decode (all codes)", same ? 0.0 : 1.0);
    static float wf[ROWS * K];
    for (int i = 0; i < ROWS * K; i++) wf[i] = frand();
    for (int m = 1; m <= M; m++) {
        S->gemm_f32(px, m, wf, K, ROWS, K - 3, ys, ROWS);
        N->gemm_f32(px, m, wf, K, ROWS, K - 3, yn, ROWS);
        CHECK("gemm_f32", rel(yn, ys, m * ROWS));
    }
    static uint16_t wb[ROWS * K];
    for (int i = 0; i < ROWS * K; i++) { float f = frand(); uint32_t u; memcpy(&u, &f, 4); wb[i] = (uint16_t)(u >> 16); }
    for (int m = 1; m <= M; m++) {
        S->bf16_dot(wb, K, ROWS, K - 3, px, m, ys, ROWS); /* ragged row end */
        N->bf16_dot(wb, K, ROWS, K - 3, px, m, yn, ROWS);
        CHECK("bf16_dot", rel(yn, ys, m * ROWS));
    }
    /* Index scores: 11 heads (pairs and the rest), 40-wide keys, one tile of 32 rows, then the
     * threaded driver over 300 bf16 keys (a partial tile) for 3 queries. */
    {
        enum { IH = 11, ID = 40, IS = 3, IT = 300 };
        static float iq[IS * IH * ID], iw[IS * IH], kt[ID * FD_INDEX_TILE] __attribute__((aligned(64)));
        static float is_[IS * IT], in_[IS * IT];
        static uint16_t ik[IT * ID];
        for (int i = 0; i < IS * IH * ID; i++) iq[i] = frand();
        for (int i = 0; i < IS * IH; i++) iw[i] = frand();
        for (int i = 0; i < ID * FD_INDEX_TILE; i++) kt[i] = frand();
        for (int i = 0; i < IT * ID; i++) { float f = frand(); uint32_t u; memcpy(&u, &f, 4); ik[i] = (uint16_t)(u >> 16); }
        S->index_tile(iq, iw, IH, ID, kt, is_);
        N->index_tile(iq, iw, IH, ID, kt, in_);
        CHECK("index_tile", rel(in_, is_, FD_INDEX_TILE));
        char ierr[160];
        int ia = fd_index_scores(S, 1, iq, iw, IS, IH, ID, FD_KEYS_BF16, ik, ID, NULL, IT, is_, IT, ierr, sizeof ierr);
        int ib = fd_index_scores(N, 3, iq, iw, IS, IH, ID, FD_KEYS_BF16, ik, ID, NULL, IT, in_, IT, ierr, sizeof ierr);
        CHECK("index_scores", (ia || ib) ? 1.0 : rel(in_, is_, IS * IT));
        /* sink attention: the same queries' first head set over a fp32 and a bf16 row set */
        static float win[5 * ID], ao_s[IH * ID], ao_n[IH * ID];
        for (int i = 0; i < 5 * ID; i++) win[i] = frand();
        const fd_row_set sets[2] = {{win, FD_ROWS_F32, ID, 5, NULL, NULL, 0},
                                    {ik, FD_ROWS_BF16, ID, IT, NULL, NULL, 0}};
        int sa = fd_sink_attention(S, 1, iq, 0.1f, iw, IH, ID, sets, 2, ao_s, ierr, sizeof ierr);
        int sb = fd_sink_attention(N, 3, iq, 0.1f, iw, IH, ID, sets, 2, ao_n, ierr, sizeof ierr);
        CHECK("sink_attention", (sa || sb) ? 1.0 : rel(ao_n, ao_s, IH * ID));
    }
    /* Expert FFN, 3 experts, 7 tokens x 2 slots (fused and GEMM paths), 3 threads. */
    enum { D = 128, I = 64, E = 3, T = 7, KS = 2 };
    static uint8_t ew[E][3][D * I / 2], es_[E][3][D * I / 32];
    fd_fp4_expert ex[E];
    for (int e = 0; e < E; e++) {
        for (int j = 0; j < 3; j++) {
            for (int i = 0; i < D * I / 2; i++) ew[e][j][i] = (uint8_t)next();
            for (int i = 0; i < D * I / 32; i++) es_[e][j][i] = (uint8_t)(121 + next() % 5);
        }
        ex[e] = (fd_fp4_expert){ew[e][0], es_[e][0], ew[e][1], es_[e][1], ew[e][2], es_[e][2]};
    }
    static float xt[T * D], ya[T * D], yb[T * D], wt[T * KS];
    static int32_t ids[T * KS];
    for (int i = 0; i < T * D; i++) xt[i] = frand();
    for (int t = 0; t < T; t++) {
        ids[t * KS] = t % E; ids[t * KS + 1] = t < 5 ? 2 - (t % 2) : 0;
        wt[t * KS] = 0.5f; wt[t * KS + 1] = 0.25f;
    }
    char err[160];
    int ra = fd_expert_ffn(S, 1, xt, 0, 0, T, D, I, ex, E, ids, wt, KS, 10.0f, ya, 0, err, sizeof err);
    int rb = fd_expert_ffn(N, 3, xt, 0, 0, T, D, I, ex, E, ids, wt, KS, 10.0f, yb, 0, err, sizeof err);
    CHECK("expert_ffn", (ra || rb) ? 1.0 : rel(yb, ya, T * D));
    /* the int8 path: an h within float rounding of a quantization tie may round either way
     * (one step of its block), hence 5e-3 */
    memset(ya, 0, sizeof ya);
    memset(yb, 0, sizeof yb);
    ra = fd_expert_ffn(S, 1, xt, 0, 1, T, D, I, ex, E, ids, wt, KS, 10.0f, ya, 0, err, sizeof err);
    rb = fd_expert_ffn(N, 3, xt, 0, 1, T, D, I, ex, E, ids, wt, KS, 10.0f, yb, 0, err, sizeof err);
    double e8 = (ra || rb) ? 1.0 : rel(yb, ya, T * D);
    printf("%-28s %.3g\n", "expert_ffn (int8)", e8);
    if (!(e8 <= 5e-3)) failures++;
    printf("%s\n", failures ? "FAILED" : "OK");
    return failures != 0;
}
"""


@pytest.mark.skipif(
    platform.machine().lower() in ("aarch64", "arm64"), reason="ARM runs NEON natively"
)
@pytest.mark.skipif(not (CC and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_variant_equals_scalar_under_qemu(tmp_path):
    driver = tmp_path / "neon_check.c"
    driver.write_text(DRIVER)
    sources = [
        CSRC / name
        for name in (
            "quant_scalar.c",
            "quant_neon.c",
            "experts.c",
            "indexer.c",
            "attention.c",
            "fd_pool.c",
            "fd_platform.c",
            "cpu_features.c",
        )
    ]
    exe = tmp_path / "neon_check"
    build = subprocess.run(
        [CC, "-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
        + ["-DFD_HAVE_NEON_VARIANTS=1", "-pthread", "-static", f"-I{CSRC}"]
        + [str(s) for s in sources]
        + [str(driver), "-lm", "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
